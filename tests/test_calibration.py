"""Activation statistics: exact across ranks, both sources, and the variance-aware score.

Distributed results are compared with a single-process reference computed in plain torch (hooks
on the full data, float64), independently of ``ds_bitter7.calibration``.
"""

from __future__ import annotations

import math
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import VOCAB, ds_config, out_module_inputs, tiny_model
from workers import pruned_elements_zero

import ds_bitter7
from ds_bitter7.calibration import UnitStats, unit_std
from ds_bitter7.structures import unit_groups

BOTH = ["mlp_neuron", "attention_head"]
N_BATCHES = 6  # split evenly over 1, 2 and 3 ranks


PAD = torch.zeros(2, 16, dtype=torch.bool)
PAD[1, 10:] = True  # right padding of the second row


def unpadded(data: List[torch.Tensor]) -> List[torch.Tensor]:
    """Each padded batch as its real tokens only: row 0 whole, row 1's first 10 tokens."""
    return [part for x in data for part in (x[:1], x[1:, :10])]


def batches(n: int = N_BATCHES, seed: int = 7) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def reference_stats(family: str, data) -> Dict[str, tuple]:
    from ds_bitter7.config import StructureName

    x = out_module_inputs(tiny_model(family), data, [StructureName(k) for k in BOTH])
    return {k: (v.shape[0], v.mean(0), v.var(0, unbiased=False), v.T @ v / v.shape[0]) for k, v in x.items()}


# -- runs on every rank ----------------------------------------------------------------------------
# (family, ZeRO stage, batch kind) per world size; world 2 also runs the other suites (one spawn).
STATS_CASES = {1: [("llama", 2, "dict")],
               2: [("gpt2", 2, "dict"), ("llama", 1, "tensor"), ("gpt2", 1, "second_moment"),
                   ("llama", 2, "padded")],
               3: [("gpt2", 0, "uneven"), ("llama", 2, "tensor")]}


def calibration_suite(cases, extras: bool) -> dict:
    out = {"stats": stats_suite(cases)}
    if extras:
        out["training"] = training_window()
        out["ls_window"] = least_squares_window()
        out["events"] = {mode: window_per_event(mode) for mode in ("mean", "least_squares")}
        out["variance"] = variance_score()
        out["fluctuation"] = fluctuation_score()
        out["in_step"] = {score: model_score_in_step(score) for score in ("fluctuation", "bitter7_obs")}
        out["generator"] = generator_calibration()
        out["mixed_kinds"] = {source: mixed_calibration_kinds(source) for source in ("calibration", "training")}
        out["bad_batch"] = {where: bad_batch_on_one_rank(where)  # last: they raise
                            for where in ("forward", "fetch", "one_batch", "tuples", "none")}
    return out


def stats_suite(cases) -> list:
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    for family, stage, kind in cases:
        mine = batches()[rank::world]
        if kind == "uneven" and world > 1 and rank == world - 1:
            mine = mine + batches(1, seed=99)  # one rank has more: every rank runs the minimum
        calib = [{"input_ids": x} for x in mine] if kind == "dict" else mine
        if kind == "padded":  # 6 pad positions in each second row: they must not count
            calib = [{"input_ids": x.masked_fill(PAD, 0), "attention_mask": (~PAD).long()} for x in mine]
        model = tiny_model(family)
        # "second_moment": the X^T X that least squares uses; compensation is off
        comp = ({"enabled": False, "mode": "least_squares"} if kind == "second_moment" else {"enabled": True})
        cfg = ds_config(stage, "fp32", {"structures": BOTH, "score": "bitter7_variance",
                                        "bias_compensation": dict(comp, num_batches=8)})
        engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                           calibration_data=calib)
        pruner = ds_bitter7.get_pruner(engine)
        model.train()
        stats = pruner.stats.gather()
        assert model.training, "calibration must restore train mode"
        out.append({k: (s.count, s.mean, s.var, s.second_moment) for k, s in stats.items()})
    return out


def _hook_out_inputs(model, structures) -> tuple:
    """(rows seen per group key, hook handles): every forward's input of each out projection."""
    from ds_bitter7.config import StructureName

    seen: Dict[str, list] = {}
    hooks = [model.get_submodule(g.out_module).register_forward_pre_hook(
        lambda m, a, key=g.key: seen.setdefault(key, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for g in unit_groups(model, [StructureName(k) for k in structures])]
    return seen, hooks


def _reduced_sums(x: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares, X^T X) of this rank's rows ``x``, summed over ranks: float64."""
    x = x.double()
    sums = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64), x.sum(0), x.square().sum(0),
                      (x.T @ x).reshape(-1)])
    dist.all_reduce(sums)
    return sums


def training_window() -> dict:
    """Source 'training': gather() sees exactly the training forwards of the last `window` optimizer
    steps of every rank, every micro-batch (two per step here)."""
    rank = dist.get_rank()
    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"structures": BOTH, "score": "bitter7_variance",
                                "schedule": {"start_step": 1000, "end_step": 1000},
                                "bias_compensation": {"enabled": True, "source": "training", "window": 2}},
                    gradient_accumulation_steps=2)
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    seen, hooks = _hook_out_inputs(model, BOTH)
    data = batches(7, seed=10 + rank)
    for x in data[:6]:  # 3 optimizer steps of 2 micro-batches
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    model.eval()
    with torch.no_grad():
        model(data[6])  # eval forwards are not training statistics
    model.train()
    for h in hooks:
        h.remove()
    stats = pruner.stats.gather()
    errors = {}
    for key, rows in seen.items():
        sums = _reduced_sums(torch.cat(rows[2:6]))  # the forwards of steps 2 and 3 on this rank
        n, f = sums[0], rows[0].shape[1]
        mean = sums[1:1 + f] / n
        var = sums[1 + f:1 + 2 * f] / n - mean.square()
        errors[key] = (int(n) == stats[key].count, float((stats[key].mean - mean).abs().max()),
                       float((stats[key].var - var).abs().max()))
    again = pruner.stats.gather()  # gathering between events consumes nothing
    errors["again"] = all(torch.equal(again[k].mean, stats[k].mean) for k in stats)
    pruner.prune_to(0.25)
    try:  # the window restarts after an event: nothing observed since
        pruner.stats.gather()
        errors["reset"] = False
    except RuntimeError:
        errors["reset"] = True
    return errors


def least_squares_window() -> dict:
    """Source 'training' with least squares keeps the F x F sums only in the `window` steps before a
    scheduled event (event at step 4, window 2, two micro-batches per step: the four forwards of
    steps 3 and 4), not on every step, and in one running sum per group, not one per forward, freed
    by the first training forward after the event."""
    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron"], "target_sparsity": 0.5,
                                "schedule": {"start_step": 4, "end_step": 4},
                                "bias_compensation": {"enabled": True, "source": "training", "window": 2,
                                                      "mode": "least_squares"}},
                    gradient_accumulation_steps=2)
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    seen, hooks = _hook_out_inputs(model, ["mlp_neuron"])
    kept, errors = [], {}
    for i, x in enumerate(batches(8, seed=20 + dist.get_rank())):
        kept.append(max(len(d) for d in pruner.stats._recent.values()))
        engine.backward(engine(input_ids=x, labels=x).loss)
        if i == 7:  # the event runs in this step: what it will gather, against the hooked rows
            stats = pruner.stats.gather()
            for key, rows in seen.items():
                sums = _reduced_sums(torch.cat(rows[4:8]))
                n, f = sums[0], rows[0].shape[1]
                errors[key] = (int(n) == stats[key].count, float(
                    (stats[key].second_moment - sums[1 + 2 * f:].view(f, f) / n).abs().max()))
        engine.step()
    for h in hooks:
        h.remove()
    x = batches(1, seed=30)[0]
    engine(input_ids=x, labels=x)  # the first training forward after the event frees its window
    return {"kept": kept, "errors": errors, "mode": pruner.last_event["compensation"]["mode"],
            "step": pruner.last_event["step"], "after": max(len(d) for d in pruner.stats._recent.values())}


def window_per_event(mode: str) -> list:
    """Events at steps 2, 4 and 6 with a window of 3 steps: each event's statistics are the
    forwards since the previous one (2 steps of 2 x 16 tokens on each of 2 ranks), never older."""
    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron"], "target_sparsity": 0.5,
                                "schedule": {"start_step": 2, "end_step": 6, "frequency": 2, "shape": "linear"},
                                "bias_compensation": {"enabled": True, "source": "training", "window": 3,
                                                      "mode": mode}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    for x in batches(6, seed=40 + dist.get_rank()):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return [(e["step"], e["stats_rows"]) for e in pruner.events]


def variance_score() -> dict:
    """bitter7_variance = bitter7 unit score x unit activation std; the event prunes the lowest."""
    from ds_bitter7.scores import get_scorer

    rank = dist.get_rank()
    model = tiny_model("llama")
    cfg = ds_config(2, "fp32", {"structures": BOTH, "score": "bitter7_variance",
                                "schedule": {"start_step": 1000, "end_step": 1000}})
    calib = batches()[rank::dist.get_world_size()]
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calib)
    pruner = ds_bitter7.get_pruner(engine)
    x = batches(1, seed=5 + rank)[0]
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    scores = pruner.unit_scores()
    stats = pruner.stats.gather()
    variance_scorer = pruner.scorer
    pruner.scorer = get_scorer("bitter7")
    plain = pruner.unit_scores()
    pruner.scorer = variance_scorer
    event = pruner.prune_to(0.5)
    res = {"event_keys": sorted(event)}
    for g in pruner.groups:
        expect = plain[g.key] * unit_std(g, stats[g.key])
        res[g.key] = (float(((scores[g.key] - expect).abs() / expect.abs().clamp(min=1e-300)).max()),
                      scores[g.key], pruner.masks[g.key].clone())
    return res


def fluctuation_score() -> dict:
    """score 'fluctuation' (FLAP): per unit, sum over its features of Var(x_f) * ||W_next[f, :]||^2,
    from the gathered statistics and the replicated weights; no optimizer step needed."""
    rank = dist.get_rank()
    model = tiny_model("llama")
    cfg = ds_config(2, "fp32", {"structures": BOTH, "score": "fluctuation",
                                "schedule": {"start_step": 1000, "end_step": 1000}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=batches()[rank::dist.get_world_size()])
    pruner = ds_bitter7.get_pruner(engine)
    scores, stats = pruner.unit_scores(), pruner.stats.gather()
    errors = {}
    for g in pruner.groups:
        w = model.get_parameter(g.out_weight).detach().double()  # [out, in]: a feature is a column
        expect = torch.zeros(g.n_units, dtype=torch.float64)
        for f, unit in enumerate(g.feature_units.tolist()):
            if unit >= 0:
                expect[unit] += stats[g.key].var[f] * w[:, f].square().sum()
        errors[g.key] = float(((scores[g.key] - expect).abs() / expect.abs().clamp(min=1e-300)).max())
    pruner.prune_to(0.5)
    errors["pruned"] = {k: int((~m).sum()) for k, m in pruner.masks.items()}
    return errors


def model_score_in_step(score: str) -> dict:
    """A scheduled fluctuation / bitter7_obs event (it reads the model's W_next), source 'training', mean
    compensation, under ZeRO-2 with decay / no-decay groups (as HF Trainer builds them): mid-step
    each rank's model copy holds only its own slice of the first group's new weights, so the event
    must wait for engine.step() to return, else the ranks' masks differ."""
    rank = dist.get_rank()
    model = tiny_model("gpt2")
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if not n.endswith("weight")], "weight_decay": 0.0}]
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron"], "score": score, "min_units_per_layer": 0,
                                "schedule": {"start_step": 3, "end_step": 3}, "target_sparsity": 0.5,
                                "bias_compensation": {"enabled": True, "source": "training", "window": 2}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=groups, config=cfg)
    pruner = ds_bitter7.get_pruner(engine)
    for x in batches(3, seed=20 + rank):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return {"events": [e["step"] for e in pruner.events], "masks": {k: v.clone() for k, v in pruner.masks.items()},
            "zero": pruned_elements_zero(pruner),
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if "mlp" in n}}


def generator_calibration() -> list:
    """A generator as calibration_data: read once, its batches serve every event (not only the first)."""
    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron"], "score": "magnitude",
                                "bias_compensation": {"enabled": True, "num_batches": 2}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=(x for x in batches(2)))
    pruner = ds_bitter7.get_pruner(engine)
    return [pruner.prune_to(f)["compensation"]["units"] for f in (0.25, 0.5)]


def mixed_calibration_kinds(source: str) -> list:
    """Rank 0 gives a generator, the others a list (source 'calibration') or nothing ('training'):
    reading the generator is collective on every rank (it was entered by rank 0 alone, whose
    all-reduce then met another rank's gradient all-reduce)."""
    rank = dist.get_rank()
    model = tiny_model("gpt2")
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron"], "score": "magnitude", "target_sparsity": 0.5,
                                "schedule": {"start_step": 2, "end_step": 2},
                                "bias_compensation": {"enabled": True, "source": source, "num_batches": 2}})
    data = batches(2)
    given = (x for x in data) if rank == 0 else (list(data) if source == "calibration" else None)
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=given)
    pruner = ds_bitter7.get_pruner(engine)
    for x in batches(3):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return [(e["step"], e["compensation"]["units"]) for e in pruner.events]


class MissingOnThisNode:
    """Calibration data whose iteration fails (a shard missing on this node)."""

    def __iter__(self):
        raise FileNotFoundError("calibration shard missing on this node")


def bad_batch_on_one_rank(where: str) -> str:
    """On rank 1 the calibration data fails: ``forward``, a batch has a token id past the
    vocabulary; ``fetch``, iterating it raises; ``one_batch``, it is one batch, not a list of them
    (refused at initialize); ``tuples``, its batches are tuples; ``none``, it is not given (the
    others waited in DeepSpeed's start). Every rank must raise with it
    instead of waiting in the statistics' all-reduces."""
    rank = dist.get_rank()
    model = tiny_model("gpt2")
    data = batches(2)
    if rank == 1:
        data = {"forward": data[:1] + [data[1].clone().fill_(VOCAB + 5)], "fetch": MissingOnThisNode(),
                "one_batch": {"input_ids": data[0]}, "tuples": [(x,) for x in data], "none": None}[where]
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron"], "score": "bitter7_variance"})
    try:
        engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                           calibration_data=data)
        ds_bitter7.get_pruner(engine).stats.gather()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return " ".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", [])])
    return "no error"


# -- tests -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world2():
    return run_distributed(calibration_suite, 2, STATS_CASES[2], True, timeout=180)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_stats_equal_single_process_statistics(world_size, request):
    cases = STATS_CASES[world_size]
    if world_size == 2:
        results = request.getfixturevalue("world2")
    else:
        results = run_distributed(calibration_suite, world_size, cases, False, timeout=180)
    full = batches()
    for i, (family, stage, kind) in enumerate(cases):
        ref = reference_stats(family, unpadded(full) if kind == "padded" else full)
        tol = 1e-5 if kind == "padded" else 1e-10  # other kernels on shorter rows: float32 rounding
        for rank, res in enumerate(r["stats"][i] for r in results):
            case = (family, stage, kind, rank)
            assert res.keys() == ref.keys(), case
            for key, (count, mean, var, second) in res.items():
                assert count == ref[key][0], case
                assert (second is None) == (kind != "second_moment"), case
                if second is not None:
                    assert torch.allclose(second, ref[key][3], rtol=1e-10, atol=1e-12), (case, key)
                assert mean.dtype == torch.float64 and var.dtype == torch.float64
                assert torch.allclose(mean, ref[key][1], rtol=tol, atol=tol * 1e-2), (case, key)
                assert torch.allclose(var, ref[key][2], rtol=10 * tol, atol=tol * 1e-2), (case, key)


def test_training_source_keeps_last_window_and_resets(world2):
    for res in (r["training"] for r in world2):
        res = dict(res)
        assert res.pop("reset") is True
        assert res.pop("again") is True
        for key, (count_ok, dmean, dvar) in res.items():
            assert count_ok, key
            assert dmean < 1e-10 and dvar < 1e-9, (key, dmean, dvar)


def test_least_squares_training_source_records_only_before_an_event(world2):
    for res in (r["ls_window"] for r in world2):
        # entries held before each of the 8 forwards (2 per step): none before step 3, then one
        assert res["kept"] == [0, 0, 0, 0, 0, 1, 1, 1], res["kept"]
        assert res["mode"] == "least_squares" and res["step"] == 4 and res["after"] == 0, res
        assert res["errors"], res
        for key, (count_ok, dsecond) in res["errors"].items():
            assert count_ok and dsecond < 1e-9, (key, dsecond)


def test_each_event_sees_the_window_since_the_previous_one(world2):
    for res in (r["events"] for r in world2):
        for mode, events in res.items():
            assert events == [(2, 128), (4, 128), (6, 128)], (mode, events)


def test_bitter7_variance_scores_and_prunes_lowest(world2):
    for res in (dict(r["variance"]) for r in world2):
        assert "compensation" not in res.pop("event_keys")  # compensation is off here
        mlp = []
        for key, (rel, scores, keep) in res.items():
            assert rel < 1e-12, key
            if key.endswith("mlp"):
                mlp.append((scores, keep))
        scores = torch.cat([s for s, _ in mlp])
        keep = torch.cat([k for _, k in mlp])
        assert int((~keep).sum()) == math.floor(0.5 * keep.numel())
        assert scores[~keep].max() <= scores[keep].min()  # global threshold on the new score


def test_fluctuation_score_equals_flap_formula_and_prunes(world2):
    for res in (dict(r["fluctuation"]) for r in world2):
        pruned = res.pop("pruned")
        assert all(rel < 1e-12 for rel in res.values()), res
        assert sum(v for k, v in pruned.items() if k.endswith("mlp")) > 0
    assert world2[0]["fluctuation"]["pruned"] == world2[1]["fluctuation"]["pruned"]


def test_unit_std_is_root_mean_feature_variance():
    class G:
        n_units = 2
        feature_units = torch.tensor([0, 0, 1, 1, -1])

    stats = UnitStats(10, torch.zeros(5, dtype=torch.float64), torch.tensor([1.0, 3.0, 4.0, 4.0, 9.0], dtype=torch.float64))
    std = unit_std(G(), stats)
    assert std.dtype == torch.float64
    assert torch.allclose(std, torch.tensor([math.sqrt(2.0), 2.0], dtype=torch.float64), rtol=1e-15, atol=0)


def initialize_without_calibration_data(bitter7: dict) -> str:
    model = tiny_model("gpt2")
    try:
        ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=ds_config(2, "fp32", bitter7))
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize("bitter7,why", [({"bias_compensation": {"enabled": True}}, "bias_compensation.enabled"),
                                         ({"score": "bitter7_variance"}, "score 'bitter7_variance'")])
def test_missing_calibration_data_is_refused_at_initialize(bitter7, why):
    """One rank (a spawned one: DeepSpeed started in the test process itself would start MPI there)."""
    msg = run_distributed(initialize_without_calibration_data, 1, bitter7, timeout=120)[0]
    assert msg.startswith(f"ds_bitter7: {why} with bias_compensation.source = 'calibration' needs calibration "
                          "data"), msg


@pytest.mark.parametrize("score", ["fluctuation", "bitter7_obs"])
def test_model_reading_score_event_in_step_gives_every_rank_the_same_masks(world2, score):
    first, second = (r["in_step"][score] for r in world2)
    assert first["events"] == second["events"] == [3]
    assert sum(int((~m).sum()) for m in first["masks"].values()) > 0
    for key in first["masks"]:
        assert torch.equal(first["masks"][key], second["masks"][key]), key
    for name in first["params"]:  # compensated biases and zeroed units: the same model on both ranks
        assert torch.equal(first["params"][name], second["params"][name]), name
    assert first["zero"] == second["zero"] == {"master": True, "moments": True, "model": True}


@pytest.mark.parametrize("where,error,what", [("forward", "IndexError", "the calibration forward pass"),
                                              ("fetch", "FileNotFoundError", "reading calibration_data")])
def test_a_failing_calibration_batch_on_one_rank_fails_every_rank(world2, where, error, what):
    assert world2[0]["bad_batch"][where].startswith(f"RuntimeError: {what} failed on another rank")
    assert world2[1]["bad_batch"][where].startswith(error), world2[1]["bad_batch"][where]
    if where == "forward":  # the error says which batch
        assert "in the model's forward on calibration batch 1 (shapes (2, 16))" in world2[1]["bad_batch"][where]


@pytest.mark.parametrize("where,message", [
    ("one_batch", "calibration_data: got a dict (one batch?); pass a list (or iterable) of batches"),
    ("tuples", "calibration_data: batch 0 is a tuple: each batch is a dict of the model's keyword inputs"),
    ("none", "score 'bitter7_variance' with bias_compensation.source = 'calibration' needs calibration data")])
def test_calibration_data_of_the_wrong_form_is_refused_at_initialize(world2, where, message):
    """Refused when the pruner is built, not at the first event hours later, on every rank."""
    assert world2[0]["bad_batch"][where] == "ValueError: checking calibration_data failed on another rank; " \
        "see that rank's error"
    assert world2[1]["bad_batch"][where].startswith(f"ValueError: ds_bitter7: {message}"), world2[1]["bad_batch"][where]


def test_calibration_data_problem():
    from transformers import BatchEncoding

    from ds_bitter7.calibration import calibration_data_problem

    class MapStyle(torch.utils.data.Dataset):  # __getitem__ and __len__, no __iter__
        def __getitem__(self, i):
            return ids

        def __len__(self):
            return 2

    class Stream(torch.utils.data.IterableDataset):  # no __len__: a DataLoader over it raises on len()
        def __iter__(self):
            return iter([ids])

    ids = torch.zeros(2, 4, dtype=torch.long)
    for good in ([ids], [{"input_ids": ids, "use_cache": False}], iter([ids]), [ids, "past num_batches"],
                 MapStyle(), torch.utils.data.DataLoader(Stream(), batch_size=None),
                 [BatchEncoding({"input_ids": ids})]):
        assert calibration_data_problem(good, 1) is None, good
    for bad, message in ((ids, "got a Tensor"), ("text", "got a str"), (3, "got a int"), ([], "no batch"),
                         ([ids, [1, 2]], "batch 1 is a list"),
                         ([{"input_ids": [[1, 2]]}], "batch 0's 'input_ids' is a list, not a tensor")):
        assert message in calibration_data_problem(bad, 2)


def test_a_generator_of_calibration_batches_serves_every_event(world2):
    for res in world2:
        assert len(res["generator"]) == 2 and all(n > 0 for n in res["generator"]), res["generator"]
    for source in ("calibration", "training"):  # a generator on one rank, a list or nothing on the other
        events = [res["mixed_kinds"][source] for res in world2]
        assert events[0] == events[1] and [step for step, _ in events[0]] == [2] and events[0][0][1] > 0, events


def mask_forms() -> dict:
    """Source 'training' with the mask given by position (model(input_ids, attention_mask), LLaMA's
    order): its padded rows must not count (they did); a DataLoader of [ids, mask] pairs, met only
    at the event (a DataLoader is not iterated at initialize: an AttributeError); batches whose every
    position is masked out: the error says so (it spoke of source 'training')."""
    out = {}
    model = tiny_model("llama")
    cfg = ds_config(2, "fp32", {"structures": BOTH, "score": "bitter7_variance",
                                "schedule": {"start_step": 1000, "end_step": 1000},
                                "bias_compensation": {"enabled": True, "source": "training", "window": 1}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = batches(1)[0].masked_fill(PAD, 0)
    engine.backward(engine(x, (~PAD).long(), labels=x).loss)
    engine.step()
    out["rows"] = {k: s.count for k, s in ds_bitter7.get_pruner(engine).stats.gather().items()}
    out["real"] = int((~PAD).sum())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (~PAD).long()), batch_size=2)
    for name, calib in {"pairs": loader,  # [ids, mask] lists: a DataLoader is not iterated at initialize
                        "all_masked": [{"input_ids": x, "attention_mask": torch.zeros_like(x)}]}.items():
        model = tiny_model("gpt2")
        cfg = ds_config(2, "fp32", {"structures": BOTH, "score": "bitter7_variance",
                                    "schedule": {"start_step": 1000, "end_step": 1000}})
        engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                           calibration_data=calib)
        try:
            ds_bitter7.get_pruner(engine).stats.gather()
        except (ValueError, RuntimeError) as err:
            out[name] = str(err)
    return out


def test_masks_by_position_and_batches_of_the_wrong_form_at_the_event():
    out = run_distributed(mask_forms, 1, timeout=120)[0]
    assert set(out["rows"].values()) == {out["real"]}, out
    assert out["pairs"].startswith("ds_bitter7: calibration batch 0 is a list: each batch is a dict"), out
    assert "every position of the calibration batches is masked out by their attention_mask" in out["all_masked"]
