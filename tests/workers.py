"""Functions that run on every emulated rank (spawned by ``distributed.run_distributed``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List

import torch
import torch.distributed as dist
from reference import VOCAB, ds_config, kept_elements, known, tiny_model

import ds_bitter7
from ds_bitter7.structures import unstructured_params

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
               "all_to_all_single", "gather", "scatter", "reduce", "all_gather_object", "broadcast_object_list",
               "barrier")


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


@contextmanager
def count_collectives():
    """Count every torch.distributed collective call and the tensor bytes it is handed."""
    counts = {"bytes": 0, "calls": []}
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            counts["calls"].append(name)
            counts["bytes"] += _nbytes(args[:2]) if name != "all_gather" else _nbytes(args[1:2])
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def train_steps(engine, n: int, seed: int = 0) -> List[float]:
    """``n`` optimizer steps on random tokens (different on every rank)."""
    g = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    losses = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def set_known_state(pruner, seed: int = 0) -> None:
    """Write known fp32 weights and exp_avg_sq into this rank's fragments (any world size)."""
    with torch.no_grad():
        for name, frag in pruner.access.fragments.items():
            w, v = known(name, frag.param.shape, seed)
            sl = slice(frag.start, frag.start + frag.numel)
            pruner.access.master(frag).copy_(w.view(-1)[sl])
            pruner.access.state(frag).copy_(v.view(-1)[sl])


def pruned_elements_zero(pruner) -> Dict[str, bool]:
    """Invariant 3 on this rank: pruned units are exactly zero in masters, moments and the model."""
    ok = {"master": True, "moments": True, "model": True}
    for g in pruner.groups:
        keep = pruner.masks[g.key]
        for s in g.slices:
            param = pruner.model.get_parameter(s.name)
            coords = s.pruned_coords(keep)
            if coords.numel() and bool(param.detach().index_select(s.dim, coords).ne(0).any()):
                ok["model"] = False
            frag = pruner.access.fragments.get(s.name)
            if frag is None:
                continue
            drop = ~kept_elements(s, keep, frag.start, frag.numel)
            if bool(pruner.access.master(frag)[drop].ne(0).any()):
                ok["master"] = False
            views = pruner.access.moment_views(frag)
            if len(views) < 2 or any(bool(t[drop].ne(0).any()) for t in views):
                ok["moments"] = False
    return ok


def core_case(family: str, stage: int, dtype: str, bitter7: dict, seed: int = 0) -> dict:
    """Initialize, step once, set known state, prune to 0.5, step twice more; report everything."""
    model = tiny_model(family)
    cfg = ds_config(stage, dtype, {"schedule": {"start_step": 10**9, "end_step": 10**9},
                                   "min_units_per_layer": 0, **bitter7})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1, seed)
    set_known_state(pruner, seed)
    scores = pruner.unit_scores()
    with count_collectives() as counts:
        event = pruner.prune_to(0.5)
    train_steps(engine, 2, seed + 1)
    unstructured = {}
    if pruner.unstructured is not None:
        unstructured = {n: (pruner.access.fragments[n].start, m.clone())
                        for n, m in pruner.unstructured.pruned.items()}
    return {"scores": scores, "masks": {k: v.clone() for k, v in pruner.masks.items()},
            "event": {k: event[k] for k in ("sparsity", "thresholds", "bytes")},
            "collective_bytes": counts["bytes"], "collective_calls": counts["calls"],
            "zero": pruned_elements_zero(pruner), "kind": pruner.access.kind,
            "unstructured": unstructured,
            "unstructured_zero": _unstructured_zero(pruner),
            "state_bytes": sum(f.numel * 4 for f in pruner.access.fragments.values())}


def _unstructured_zero(pruner) -> bool:
    if pruner.unstructured is None:
        return True
    for name, drop in pruner.unstructured.pruned.items():
        frag = pruner.access.fragments[name]
        for t in [pruner.access.master(frag)] + pruner.access.moment_views(frag):
            if bool(t[drop].ne(0).any()):
                return False
        if bool(frag.param.detach().view(-1)[frag.start:frag.start + frag.numel][drop].ne(0).any()):
            return False
    return True


def scheduled_unstructured_two_groups(stage: int, dtype: str) -> bool:
    """A scheduled unstructured event inside the step of a two-group optimizer (decay / no decay):
    right after that step the model's pruned elements are zero on this rank, not one step later."""
    model = tiny_model("gpt2")
    names = set(unstructured_params(model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n not in names], "weight_decay": 0.0}]
    cfg = ds_config(stage, dtype, {"structures": ["unstructured"], "schedule": {"start_step": 2, "end_step": 2}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=groups, config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 2)
    assert [e["step"] for e in pruner.events] == [2]
    full = {n: torch.zeros(pruner.model.get_parameter(n).numel(), dtype=torch.bool) for n in names}
    for n, drop in pruner.unstructured.pruned.items():  # every rank's masks, gathered
        f = pruner.access.fragments[n]
        full[n][f.start:f.start + f.numel] = drop.cpu()
    for n in full:
        dist.all_reduce(full[n], op=dist.ReduceOp.MAX)
    return all(not bool(pruner.model.get_parameter(n).detach().view(-1)[m].ne(0).any()) for n, m in full.items())


def core_suite(family: str, cases: List[tuple]) -> List[dict]:
    return [core_case(family, stage, dtype, bitter7) for stage, dtype, bitter7 in cases]


def schedule_run(family: str, stage: int, bitter7: dict, steps: int) -> dict:
    """Train through a schedule; report the events and the final masks."""
    model = tiny_model(family)
    cfg = ds_config(stage, "fp32", bitter7)
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, steps)
    return {"events": [{k: e[k] for k in ("step", "fraction", "sparsity")} for e in pruner.events],
            "masks": pruner.masks, "zero": pruned_elements_zero(pruner), "step_count": pruner.step_count}


def pruned_unit_gradients(family: str, dtype: str) -> dict:
    """After an event with bias compensation, the gradients this rank computes for pruned neurons'
    and heads' parameters (taken as backward produces them, before DeepSpeed reduces or clips):
    whether each is exactly zero, and whether kept units still get gradients."""
    model = tiny_model(family)
    cfg = ds_config(2, dtype, {"structures": ["mlp_neuron", "attention_head"], "min_units_per_layer": 0,
                               "schedule": {"start_step": 10**9, "end_step": 10**9},
                               "bias_compensation": {"enabled": True, "num_batches": 1}})
    calib = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))]
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calib)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)
    pruner.prune_to(0.5)
    grads: Dict[str, torch.Tensor] = {}
    names = {s.name for g in pruner.groups for s in g.slices}
    handles = [engine.module.get_parameter(n).register_hook(lambda grad, n=n: grads.__setitem__(n, grad.detach().clone()))
               for n in names]
    train_steps(engine, 1, seed=1)
    for h in handles:
        h.remove()
    out = {"pruned_zero": True, "kept_nonzero": True, "pruned": 0}
    for g in pruner.groups:
        keep = pruner.masks[g.key]
        out["pruned"] += int((~keep).sum())
        for s in g.slices:
            pruned, kept = s.pruned_coords(keep), s.pruned_coords(~keep)
            out["pruned_zero"] &= not bool(grads[s.name].index_select(s.dim, pruned).ne(0).any())
            out["kept_nonzero"] &= bool(grads[s.name].index_select(s.dim, kept).ne(0).any())
    return out


def placeholder_case() -> dict:
    """A GPT-2 exported after layer 1 lost every head (it keeps one all-zero placeholder head, named
    in its config), pruned again to half its heads and neurons; the placeholder's weights made
    nonzero first (a config-only export trains from a random init): kept at zero from the start."""
    from ds_bitter7.shrink import shrink_model, zero_pruned_units_

    base = tiny_model("gpt2")
    masks = {"layers.1.attn": torch.zeros(4, dtype=torch.bool)}
    zero_pruned_units_(base, masks)
    model = shrink_model(base, masks)[0]
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight.fill_(0.5)
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron", "attention_head"], "min_units_per_layer": 0,
                                "schedule": {"start_step": 10**9, "end_step": 10**9}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    attach = {k: v.clone() for k, v in pruner.masks.items()}
    zero_at_attach = pruned_elements_zero(pruner)  # no moments before the first step
    train_steps(engine, 1)
    event = pruner.prune_to(0.5)
    train_steps(engine, 1)
    return {"placeholder_units": model.config.placeholder_units, "attach": attach, "masks": pruner.masks,
            "sparsity": event["sparsity"], "report": pruner.sparsity_report(), "table": pruner.format_report(),
            "zero_at_attach": {k: zero_at_attach[k] for k in ("master", "model")}, "zero": pruned_elements_zero(pruner)}


def bad_config(config: dict) -> dict:
    """initialize with a bad config: must raise before any collective."""
    model = tiny_model("gpt2")
    with count_collectives() as counts:
        try:
            ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=config)
        except ValueError as e:
            return {"error": str(e), "calls": counts["calls"]}
    return {"error": None, "calls": counts["calls"]}


def differing_configs() -> dict:
    """Rank 1 given another bitter7 section (another target; the section disabled): a ValueError on
    every rank before DeepSpeed starts, not split masks or a rank waiting for good."""
    out = {}
    for case, change in {"target": {"target_sparsity": 0.25}, "disabled": {"enabled": False}}.items():
        model = tiny_model("gpt2")
        section = {"schedule": {"start_step": 1, "end_step": 3}, **(change if dist.get_rank() == 1 else {})}
        try:
            ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=ds_config(2, "fp32", section))
            out[case] = None
        except ValueError as e:
            out[case] = str(e)
    return out


def nan_event(family: str) -> dict:
    """A NaN in one rank's optimizer state: the event prunes nothing, identically everywhere."""
    model = tiny_model(family)
    cfg = ds_config(2, "fp32", {"schedule": {"start_step": 10**9, "end_step": 10**9}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)
    if dist.get_rank() == dist.get_world_size() - 1:
        frag = next(iter(pruner.access.fragments.values()))
        pruner.access.state(frag)[0] = float("nan")
    event = pruner.prune_to(0.5)
    return {"skipped": event["skipped"], "kept": {k: int(v.sum()) for k, v in pruner.masks.items()}}


def local_failure(where: str) -> str:
    """The last rank's own work in an event fails (an out-of-memory, say): in ``scoring`` (of units),
    ``unstructured`` scoring, or ``mean`` compensation's partial sums. Every rank must raise (the
    others name it), none may wait in the next all-reduce. Returns this rank's error."""
    import ds_bitter7.compensation as compensation

    model = tiny_model("gpt2")
    structures = ["unstructured"] if where == "unstructured" else ["mlp_neuron"]
    cfg = ds_config(2, "fp32", {"schedule": {"start_step": 10**9, "end_step": 10**9}, "structures": structures,
                                "bias_compensation": {"enabled": where == "mean", "num_batches": 1}})
    calibration = [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))]
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calibration)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)

    def fail(*args):
        raise RuntimeError("injected: out of memory")

    if dist.get_rank() == dist.get_world_size() - 1:
        if where == "mean":
            compensation.local_delta = fail
        else:
            pruner._score_inputs = fail
    try:
        pruner.prune_to(0.5)
    except RuntimeError as err:
        return str(err)
    return "no error"


def retry_after_failure(fail: bool) -> dict:
    """Mean compensation fails on every rank (``fail``) in an event to 0.6, and one to 0.5 follows:
    the pruner must be as before the failed event, so the second equals a clean event (the failed
    event had already marked its units pruned, and the next compensated none of them)."""
    import ds_bitter7.compensation as compensation

    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"schedule": {"start_step": 10**9, "end_step": 10**9},
                                "structures": ["mlp_neuron", "unstructured"],
                                "bias_compensation": {"enabled": True, "num_batches": 1}})
    calibration = [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))]
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calibration)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)
    if fail:
        delta = compensation.local_delta
        compensation.local_delta = lambda *args: 1 / 0
        try:
            pruner.prune_to(0.6)  # more than the retry: what it marked must not stay pruned
        except ZeroDivisionError:
            pass
        finally:
            compensation.local_delta = delta
    event = pruner.prune_to(0.5)
    return {"units": event["compensation"]["units"], "sparsity": event["sparsity"],
            "masks": {k: v.clone() for k, v in pruner.masks.items()},
            "unstructured": {n: m.clone() for n, m in pruner.unstructured.pruned.items()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def state_beyond_target() -> list:
    """A pruner state pruned to 0.5 restored under target_sparsity 0.3: the warnings logged."""
    import logging

    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"schedule": {"start_step": 10**9, "end_step": 10**9}, "target_sparsity": 0.3})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)
    pruner.prune_to(0.5)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ds_bitter7.pruner").addHandler(handler)
    pruner.load_state_dict(pruner.state_dict(), source="the saved state")
    return records


def client_optimizer_case(family: str, stage: int) -> dict:
    """A client torch.optim.AdamW (and an LR scheduler bound to it) instead of a config optimizer,
    built before ``initialize`` adds LLaMA's missing output biases for bias compensation: they must
    be trained too, and the scheduler must still step."""
    model = tiny_model(family)
    cfg = ds_config(stage, "fp32", {"schedule": {"start_step": 10**9, "end_step": 10**9},
                                    "bias_compensation": {"enabled": True, "num_batches": 1}})
    del cfg["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # bound to the optimizer's groups
    calib = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))]
    engine, *_ = ds_bitter7.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg,
                                       calibration_data=calib)
    pruner = ds_bitter7.get_pruner(engine)
    bias = engine.module.get_parameter(pruner.groups[0].out_bias)
    train_steps(engine, 1)
    set_known_state(pruner)
    pruner.prune_to(0.5)
    before = bias.detach().clone()
    train_steps(engine, 1)
    return {"masks": pruner.masks, "zero": pruned_elements_zero(pruner), "bias_trained": not torch.equal(before, bias.detach())}


def setup_errors(stage: int) -> dict:
    """Set-ups the pruner cannot serve fail early, the same on every rank: a frozen parameter in a
    pruned unit (at attach), and an optimizer without exp_avg_sq (after step 1, not at the event)."""
    out = {}
    model = tiny_model("gpt2")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    try:
        ds_bitter7.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                              config=ds_config(stage, "fp32", {"schedule": {"start_step": 100, "end_step": 100}}))
    except ValueError as e:
        out["frozen"] = str(e)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # a large embedding: at stage 2, rank 0's partition holds no pruned unit
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, n_inner=96, vocab_size=4096, n_positions=32))
    cfg = ds_config(stage, "fp32", {"structures": ["mlp_neuron"], "schedule": {"start_step": 100, "end_step": 100}})
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    engine, *_ = ds_bitter7.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2),
                                       config=cfg)
    out["fragments"] = len(ds_bitter7.get_pruner(engine).access.fragments)
    try:
        x = torch.randint(0, 4096, (2, 16))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    except RuntimeError as e:
        out["sgd"] = str(e)
    # the units' parameters trainable but left out of the optimizer: scored without them before
    model = tiny_model("gpt2")
    try:
        ds_bitter7.initialize(model=model, model_parameters=[p for n, p in model.named_parameters() if ".mlp." in n],
                              config=ds_config(stage, "fp32", {"structures": ["attention_head"]}))
    except ValueError as e:
        out["outside"] = str(e)
    # exp_avg_sq for one param group only (Muon with its Adam part): the check looked at the first fragment
    model = tiny_model("gpt2")
    groups = [{"params": [p for p in model.parameters() if p.dim() == 1], "weight_decay": 0.0},
              {"params": [p for p in model.parameters() if p.dim() > 1]}]
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=groups, config=ds_config(
        stage, "fp32", {"structures": ["mlp_neuron"], "schedule": {"start_step": 100, "end_step": 100}}))
    pruner = ds_bitter7.get_pruner(engine)
    x = torch.randint(0, VOCAB, (2, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    base = pruner.access.base
    for p in base.param_groups[1]["params"]:  # the weights' group keeps no second moment
        base.state[p].pop("exp_avg_sq", None)
    try:
        pruner._check_optimizer_state()
    except RuntimeError as e:
        out["half_adam"] = str(e)
    return out


def prune_to_inputs() -> dict:
    """``prune_to`` with a 0-d tensor (recorded as a float), with a floor above every layer's width
    (a warning, not a silent 0%), and with fractions that are no number (a ValueError naming them)."""
    import json
    import logging

    model = tiny_model("gpt2")
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=ds_config(
        2, "fp32", {"structures": ["mlp_neuron"], "min_units_per_layer": 1000,
                    "schedule": {"start_step": 100, "end_step": 100}}))
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)
    warnings: List[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ds_bitter7.pruner").addHandler(handler)
    event = pruner.prune_to(torch.tensor(0.25))
    errors = []
    for bad in ("0.5", None, True, torch.tensor([0.1, 0.2]), float("nan")):
        try:
            pruner.prune_to(bad)
        except ValueError as e:
            errors.append(str(e))
    return {"fraction": event["fraction"], "json": bool(json.dumps(pruner.events)), "warnings": warnings,
            "errors": errors, "sparsity": event["sparsity"]}


def _batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step * 7919 + rank)
    return torch.randint(0, VOCAB, (2, 16), generator=g)


def _steps(engine, first: int, last: int) -> List[float]:
    """Steps first..last (1-based) on data fixed by (step, rank)."""
    losses = []
    for step in range(first, last + 1):
        x = _batch(step, dist.get_rank())
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def resume_run(ckpt: str, phase: str, bitter7: dict, extra: dict) -> dict:
    """'full': 6 steps, checkpoint after step 3. 'resume': load it, steps 4..6. 'rollback': 'full',
    then the same engine loads the step-3 checkpoint and takes steps 4..6 again."""
    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", bitter7, **extra)
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    def counts():
        return pruner.unstructured.pruned_counts.tolist() if pruner.unstructured is not None else None

    if phase in ("full", "rollback"):
        _steps(engine, 1, 3)
        engine.save_checkpoint(ckpt)
        at_step3 = counts()
        losses = _steps(engine, 4, 6)
        if phase == "rollback":  # the same engine goes back to step 3 and takes steps 4..6 again
            engine.load_checkpoint(ckpt)
            assert pruner.step_count == 3 and counts() == at_step3
            losses = _steps(engine, 4, 6)
    else:
        engine.load_checkpoint(ckpt)
        assert pruner.step_count == 3
        at_step3 = counts()
        losses = _steps(engine, 4, 6)
    return {"losses": losses, "masks": pruner.masks, "zero": pruned_elements_zero(pruner),
            "steps": pruner.step_count, "events": [e["step"] for e in pruner.events],
            "stats_rows": [e.get("stats_rows") for e in pruner.events],
            "unstructured": (at_step3, counts())}


def load_expecting_error(ckpt: str, bitter7: dict, corrupt_rank: int = -1) -> str:
    """Load a bad checkpoint; return the error message this rank got (or '' if none)."""
    import os

    model = tiny_model("gpt2")
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(2, "fp32", bitter7))
    if dist.get_rank() == corrupt_rank:
        with open(os.path.join(ckpt, "global_step3", f"bitter7_rank{corrupt_rank}.pt"), "r+b") as f:
            f.truncate(100)
    dist.barrier()
    try:
        engine.load_checkpoint(ckpt)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return ""


def failed_save_keeps_latest(ckpt: str, bitter7: dict) -> dict:
    """Save tag 'good' (DeepSpeed's positional arguments), then a save of 'bad' whose pruner file
    fails on rank 1 (a full disk); load 'good' back by ``latest`` and positionally."""
    import os

    from ds_bitter7 import state

    model = tiny_model("gpt2")
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(2, "fp32", bitter7))
    pruner = ds_bitter7.get_pruner(engine)
    _steps(engine, 1, 3)
    engine.save_checkpoint(ckpt, "good", {"note": "mine"}, True, False)
    _steps(engine, 4, 4)
    if dist.get_rank() == 1:
        def full_disk(obj, path):
            raise OSError(28, "No space left on device", path)
        state.atomic_save = full_disk
    error = ""
    try:
        engine.save_checkpoint(ckpt, "bad")
    except (OSError, RuntimeError) as e:
        error = str(e)
    with open(os.path.join(ckpt, "latest")) as f:
        latest = f.read()
    try:
        engine.load_checkpoint(ckpt, "nope")
    except ValueError as e:
        error += f" | {e}"
    _, by_latest = engine.load_checkpoint(ckpt)
    steps = [pruner.step_count]
    _, positional = engine.load_checkpoint(ckpt, "good", True, True, True, False)
    steps.append(pruner.step_count)
    import inspect

    return {"error": error, "latest": latest, "client": [by_latest.get("note"), positional.get("note")],
            "steps": steps, "signature": list(inspect.signature(engine.save_checkpoint).parameters)}


def raised_target_after_end(ckpt: str, bitter7: dict) -> dict:
    """Train past the schedule's end and save; resume with a higher target and the same end: the
    warnings the load logs (nothing prunes further, which must be said). Then a pruner state whose
    masks are not those of the loaded weights (another run's): the error."""
    import logging

    model = tiny_model("gpt2")
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(2, "fp32", bitter7))
    _steps(engine, 1, bitter7["schedule"]["end_step"] + 1)
    engine.save_checkpoint(ckpt)
    warnings: List[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ds_bitter7.pruner").addHandler(handler)
    model = tiny_model("gpt2")
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(2, "fp32", {**bitter7, "target_sparsity": 0.75}))
    engine.load_checkpoint(ckpt)
    pruner = ds_bitter7.get_pruner(engine)
    other = pruner.state_dict()
    other["masks"] = {k: m.roll(1) for k, m in other["masks"].items()}  # the same counts, other units
    try:
        pruner.load_state_dict(other, source="another run")
        error = ""
    except ValueError as e:
        error = str(e)
    return {"warnings": warnings, "error": error}


def one_large_parameter_checkpoint(ckpt: str) -> None:
    """ZeRO-1 on 3 ranks: the embedding holds the first two ranks' partitions whole."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(4000, 16), torch.nn.Linear(16, 8))
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for _ in range(2):
        engine.backward(engine(torch.randint(0, 4000, (1, 8))).float().pow(2).mean())
        engine.step()
    engine.save_checkpoint(ckpt)


def plain_deepspeed_checkpoint(ckpt: str) -> None:
    import deepspeed

    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {})
    del cfg["bitter7"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    _steps(engine, 1, 3)
    engine.save_checkpoint(ckpt)
