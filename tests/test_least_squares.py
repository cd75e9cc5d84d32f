"""Least-squares compensation: the solver, and the distributed update against a reference.

- Solver: when the removed features are exact linear combinations (plus a constant) of the kept
  ones, the refitted layer reproduces the unpruned output on every row; with ridge 0 the update is
  the ordinary least-squares fit of ``[X_K, 1]`` to the unpruned output.
- Distributed (ZeRO 0/1/2, GPT-2 Conv1D and LLaMA Linear, 1/2/3 ranks, 50% and 75%): after
  ``prune_to`` the out projection's weight and bias on every rank equal a single-process
  ``torch.linalg.lstsq`` reference computed from the full calibration inputs (the union of all
  ranks' batches), whichever message each layer sent (``W_R`` or the products).
- A neuron that duplicates another is removed with no change to the logits.
"""

from __future__ import annotations

import tempfile
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import VOCAB, ds_config, small_model

import ds_bitter7
from ds_bitter7.least_squares import solve_update


def _stats(x: torch.Tensor):
    mean = x.mean(0)
    return x.T @ x / x.shape[0] - torch.outer(mean, mean), mean


def test_solver_keeps_output_for_linearly_dependent_features():
    g = torch.Generator().manual_seed(0)
    n, k, r, out = 200, 6, 3, 5
    xk = torch.randn(n, k, generator=g, dtype=torch.float64)
    xr = xk @ torch.randn(k, r, generator=g, dtype=torch.float64) + torch.randn(r, generator=g, dtype=torch.float64)
    x = torch.cat([xk, xr], 1)
    w = torch.randn(k + r, out, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    cov, mean = _stats(x)
    keep, removed = torch.arange(k), torch.arange(k, k + r)
    delta, bias = solve_update(cov, mean, keep, removed, w[removed], ridge=0.0)
    refit = xk @ (w[keep] + delta) + b + bias
    assert torch.allclose(refit, x @ w + b, atol=1e-9, rtol=0)


def test_solver_equals_ordinary_least_squares():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64).exp()  # skewed, non-zero means
    w = torch.randn(10, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    keep, removed = torch.tensor([0, 2, 3, 5, 7, 9]), torch.tensor([1, 4, 6, 8])
    cov, mean = _stats(x)
    delta, bias = solve_update(cov, mean, keep, removed, w[removed], ridge=0.0)
    design = torch.cat([x[:, keep], torch.ones(300, 1, dtype=torch.float64)], 1)
    theta = torch.linalg.lstsq(design, x @ w + b).solution
    assert torch.allclose(w[keep] + delta, theta[:-1], atol=1e-9)
    assert torch.allclose(b + bias, theta[-1], atol=1e-9)


@pytest.mark.parametrize("shift,spread", [(0.0, 1.0), (30.0, 0.125), (100.0, 0.125)])
def test_ridge_zero_on_a_singular_covariance_takes_the_pseudo_inverse(shift, spread):
    """Fewer calibration rows than kept features: S_KK is singular but for rounding. A plain solve
    fitted those rows exactly with a huge D, and its error on other rows was 70x mean
    compensation's; the pseudo-inverse (the minimum-norm fit) keeps it within a few times. With
    features far from zero (``shift``), E[x x^T] - mu mu^T rounds its null space to eigenvalues
    of ~1e-11, which a cutoff relative to the largest eigenvalue inverted (8x and 275x mean
    compensation's error; now 1.9x at every shift, as unshifted)."""
    g = torch.Generator().manual_seed(0)
    f, k, out = 64, 48, 8
    mix = torch.randn(f, f, generator=g, dtype=torch.float64) * spread
    offset = shift * (0.5 + torch.rand(f, generator=g, dtype=torch.float64))
    x, held = (torch.randn(n, f, generator=g, dtype=torch.float64) @ mix + offset for n in (32, 2000))
    w = torch.randn(f, out, generator=g, dtype=torch.float64)
    keep, removed = torch.arange(k), torch.arange(k, f)
    cov, mean = _stats(x)
    delta, bias = solve_update(cov, mean, keep, removed, w[removed], ridge=0.0)
    target = held @ w
    refit = float(((held[:, keep] @ (w[keep] + delta) + bias - target) ** 2).mean())
    mean_only = float(((held[:, keep] @ w[keep] + mean[removed] @ w[removed] - target) ** 2).mean())
    assert refit < 3 * mean_only, (refit, mean_only)


def test_ridge_shrinks_the_update():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, generator=g, dtype=torch.float64)
    cov, mean = _stats(x)
    keep, removed = torch.arange(5), torch.arange(5, 8)
    small, _ = solve_update(cov, mean, keep, removed, w[removed], ridge=0.0)
    big, _ = solve_update(cov, mean, keep, removed, w[removed], ridge=10.0)
    assert big.norm() < small.norm()


# -- distributed --------------------------------------------------------------------------------------
def calibration(rank: int, world: int):
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(6)]
    return data[rank::world]


def _out_params(model, group):
    w = model.get_parameter(group.out_weight).detach().double().clone()
    return (w if group.out_in_dim == 0 else w.T.contiguous()), model.get_parameter(group.out_bias).detach().double().clone()


def out_projection_inputs(model, pruner) -> Dict[str, torch.Tensor]:
    """Each group's out-projection inputs (float64 rows) on the union of all ranks' calibration
    data, which every rank runs."""
    inputs = {g.key: [] for g in pruner.groups}
    hooks = [model.get_submodule(g.out_module).register_forward_pre_hook(
        lambda m, a, k=g.key: inputs[k].append(a[0].detach().double().reshape(-1, a[0].shape[-1])))
        for g in pruner.groups]
    model.eval()
    with torch.no_grad():
        for x in calibration(0, 1):
            model(x)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def ls_case(family: str, stage: int, fraction: float) -> Dict[str, dict]:
    """Prune ``fraction`` of the neurons with least squares; return what the test compares per group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model(family)
    bitter7 = {"structures": ["mlp_neuron"], "score": "magnitude", "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": True, "mode": "least_squares", "ridge": 0.0}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, "fp32", bitter7), calibration_data=calibration(rank, world))
    pruner = ds_bitter7.get_pruner(engine)
    inputs = out_projection_inputs(model, pruner)
    before = {g.key: _out_params(model, g) for g in pruner.groups}
    event = pruner.prune_to(fraction)
    out = {}
    for g in pruner.groups:
        w, b = _out_params(model, g)
        out[g.key] = {"x": inputs[g.key], "w0": before[g.key][0], "b0": before[g.key][1],
                      "w": w, "b": b, "keep": pruner.masks[g.key].clone(), "ids": g.feature_units.clone()}
    out["_event"] = event["compensation"]
    return out


def ls_suite(cases) -> list:
    return [ls_case(*c) for c in cases]


def _reference(case: dict):
    """Single-process least squares of [X_K, 1] onto the unpruned output, from full tensors."""
    x, w0, b0 = case["x"], case["w0"], case["b0"]
    ids = case["ids"]
    keep = (ids < 0) | case["keep"][ids.clamp(min=0)]
    design = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    theta = torch.linalg.lstsq(design, x @ w0 + b0).solution
    w = torch.zeros_like(w0)
    w[keep] = theta[:-1]
    return w, theta[-1]


# (family, stage, fraction): at 0.75 most layers send S_KR W_R and mu_R W_R ((|K|+1) rows), at 0.5 W_R
CASES = {1: [("gpt2", 2, 0.5), ("llama", 0, 0.75)], 2: [("gpt2", 2, 0.5), ("llama", 1, 0.75), ("gpt2", 0, 0.75)],
         3: [("gpt2", 1, 0.75), ("llama", 2, 0.5)]}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distributed_update_equals_single_process_reference(world_size):
    results = run_distributed(ls_suite, world_size, CASES[world_size], timeout=120)
    by_products = groups = 0
    for c, case in enumerate(CASES[world_size]):
        for rank_out in results:
            got = rank_out[c]
            event = got.pop("_event")
            assert event["mode"] == "least_squares" and event["units"] > 0
            assert event["covariance_bytes"] == sum(v["x"].shape[1] ** 2 * 8 for v in got.values())
            # each group moved the smaller of W_R and the products; nothing at stage 0
            rows = []
            for v in got.values():
                kept = int(((v["ids"] < 0) | v["keep"][v["ids"].clamp(min=0)]).sum())
                removed = v["x"].shape[1] - kept
                rows.append((min(removed, kept + 1) * v["w0"].shape[1], kept + 1 < removed))
            assert event["groups_by_products"] == sum(by for _, by in rows)
            assert event["gathered_bytes"] == sum(n for n, _ in rows) * 8
            by_products += event["groups_by_products"]
            groups += event["groups"]
            for key, v in got.items():
                w, b = _reference(v)
                scale = v["w0"].abs().max()
                assert torch.allclose(v["w"], w, atol=1e-4 * scale, rtol=0), (case, key)
                assert torch.allclose(v["b"], b, atol=1e-4 * scale, rtol=0), (case, key)
    assert 0 < by_products < groups  # both messages were exercised


def unstructured_case(stage: int, layers_per_pass: int) -> List[float]:
    """Unstructured pruning first (the floor keeps every unit), then half the neurons with least
    squares: the masks take back the refit's entries on dropped elements of W_next, and the bias
    gives their mean part back. Returns each block's shift of its mean output (fixed inputs)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model("gpt2")
    bitter7 = {"structures": ["mlp_neuron", "unstructured"], "score": "magnitude", "min_units_per_layer": 10**6,
               "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": True, "mode": "least_squares", "layers_per_pass": layers_per_pass}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, "fp32", bitter7), calibration_data=calibration(rank, world))
    pruner = ds_bitter7.get_pruner(engine)
    pruner.prune_to(0.5)  # unstructured elements only
    pruner.config.min_units_per_layer = 0
    inputs = out_projection_inputs(model, pruner)
    before = {g.key: _out_params(model, g) for g in pruner.groups}
    event = pruner.prune_to(0.5)
    assert event["compensation"]["units"] > 0
    shifts = []
    for g in pruner.groups:
        mu = inputs[g.key].mean(0)
        (w0, b0), (w, b) = before[g.key], _out_params(model, g)
        shifts.append(float(((mu @ w + b) - (mu @ w0 + b0)).abs().max() / (mu @ w0 + b0).abs().max()))
    return shifts


@pytest.mark.parametrize("stage,layers_per_pass", [(0, 0), (2, 0), (2, 1)])
def test_unstructured_elements_keep_the_least_squares_mean(stage, layers_per_pass):
    """The refit's bias assumed all of its weight update stays: the shift was 3-7% of the output.
    With one layer per pass, each layer's part is summed and applied before the next pass."""
    for shifts in run_distributed(unstructured_case, 2, stage, layers_per_pass, timeout=120):
        assert max(shifts) <= 1e-6, shifts


def duplicate_neuron_case(stage: int) -> float:
    """Neuron 7 of block 1 copies neuron 3 (same c_fc column and bias) with small out weights, so
    it is pruned first; least squares moves its weights onto neuron 3: the logits do not change."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model("gpt2")
    mlp = model.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, 7] = mlp.c_fc.weight[:, 3]
        mlp.c_fc.bias[7] = mlp.c_fc.bias[3]
        mlp.c_proj.weight[7, :] *= 0.01
    data = calibration(rank, world)
    model.eval()
    with torch.no_grad():
        before = torch.cat([model(x).logits.double() for x in data])
    bitter7 = {"structures": ["mlp_neuron"], "score": "magnitude", "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": True, "mode": "least_squares", "ridge": 0.0}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, "fp32", bitter7), calibration_data=data)
    pruner = ds_bitter7.get_pruner(engine)
    pruner.prune_to(1.5 / sum(g.n_units for g in pruner.groups))
    assert (~pruner.masks["layers.1.mlp"]).nonzero().flatten().tolist() == [7]
    model.eval()
    with torch.no_grad():
        after = torch.cat([model(x).logits.double() for x in data])
    return float((after - before).abs().max() / before.abs().max())


def test_duplicate_neuron_is_removed_without_changing_logits():
    errors = run_distributed(duplicate_neuron_case, 2, 2, timeout=90)
    assert max(errors) <= 1e-5, errors


def overflow_case(mode: str) -> dict:
    """Neuron 5 of block 0 overflows on every calibration row (c_fc weights and bias of 3e38: inf or
    NaN, as an fp16 forward that overflowed); magnitude keeps it. Block 0's statistics and block
    1's (fed by block 0's inf output) are not finite: those groups are pruned without compensation
    instead of getting NaN weights (mean mode needs only the removed units' means: block 0 is fine)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, 5] = 3e38
        model.transformer.h[0].mlp.c_fc.bias[5] = 3e38
    bitter7 = {"structures": ["mlp_neuron"], "score": "magnitude", "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": True, "mode": mode}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(2, "fp32", bitter7), calibration_data=calibration(rank, world))
    event = ds_bitter7.get_pruner(engine).prune_to(0.5)
    return {"skipped": event["compensation"]["skipped"], "groups": event["compensation"]["groups"],
            "finite": all(bool(torch.isfinite(p).all()) for n, p in model.named_parameters() if "c_proj" in n),
            "sparsity": event["sparsity"]}


@pytest.mark.parametrize("mode,skipped", [("mean", ["layers.1.mlp"]), ("least_squares", ["layers.0.mlp", "layers.1.mlp"])])
def test_non_finite_statistics_skip_compensation_not_poison_weights(mode, skipped):
    for out in run_distributed(overflow_case, 2, mode, timeout=90):
        assert out["skipped"] == skipped and out["groups"] == 2 - len(skipped)
        assert out["finite"] and out["sparsity"] == {"mlp_neuron": 0.5}


# -- layers_per_pass ----------------------------------------------------------------------------------
class Reshuffled:
    """Calibration data that yields its batches in another order, and so another 2 of them, each
    time it is iterated (a shuffling DataLoader)."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __iter__(self):
        self.calls += 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.calls))
        return iter([self.batches[i] for i in order])


def passes_case(family: str, layers_per_pass: int, stage: int = 2, scheduled: bool = False, made=None) -> dict:
    """``obs`` + least squares at 75% of neurons and heads; what the comparison needs. ``scheduled``:
    the event comes from the schedule, at step 1 (inside the optimizer step at stage 0)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model(family)
    at = 1 if scheduled else 1000
    bitter7 = {"structures": ["mlp_neuron", "attention_head"], "score": "obs", "target_sparsity": 0.75,
               "schedule": {"start_step": at, "end_step": at},
               "bias_compensation": {"enabled": True, "mode": "least_squares", "num_batches": 2,
                                     "layers_per_pass": layers_per_pass}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, "fp32", bitter7),
                                       calibration_data=Reshuffled(calibration(0, 1)[rank::world]))
    pruner = ds_bitter7.get_pruner(engine)
    if made is not None:
        made(engine)
    if scheduled:
        x = calibration(0, 1)[rank]  # a training batch
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        event = pruner.last_event
    else:
        event = pruner.prune_to(0.75)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "masks": {k: m.clone() for k, m in pruner.masks.items()}, "passes": event["stats_passes"],
            "groups": len(pruner.groups), "refit": event["compensation"]["groups"],
            "update_bytes": event["compensation"]["update_bytes"]}


def passes_suite(family: str, stage: int, scheduled: bool) -> list:
    return [passes_case(family, 0, stage, scheduled), passes_case(family, 1, stage, scheduled)]


@pytest.mark.parametrize("world_size,family,stage,scheduled", [(1, "llama", 2, False), (2, "gpt2", 2, False),
                                                               (1, "gpt2", 0, True)])
def test_layers_per_pass_gives_the_one_pass_result(world_size, family, stage, scheduled):
    """One layer's F x F per calibration pass: the same masks and bit-identical weights as every
    layer in one pass, from one pass for the vectors, one per group for the greedy and one per
    refit group, every pass over the batches the first took (the data reshuffles per iteration).
    Also for an event of the schedule that runs inside the optimizer step (stage 0)."""
    for one, chunked in run_distributed(passes_suite, world_size, family, stage, scheduled, timeout=120):
        assert one["passes"] == 1 and chunked["passes"] == 1 + one["groups"] + one["refit"]
        assert all(torch.equal(one["masks"][k], chunked["masks"][k]) for k in one["masks"])
        assert not all(bool(m.all()) for m in one["masks"].values())  # the event pruned
        assert all(torch.equal(one["params"][n], chunked["params"][n]) for n in one["params"])
        assert chunked["update_bytes"] < one["update_bytes"]  # one refit layer's D held at a time


def failing_chunk_case(fail_at: int) -> tuple:
    """``passes_case``'s event with ``layers_per_pass: 1`` whose ``fail_at``-th solve raises: its
    error, and what a second event then does."""
    import ds_bitter7.least_squares as ls

    solve, calls = ls.solve_products, []

    def failing(*args):
        calls.append(1)
        if len(calls) == fail_at:
            raise ValueError("injected")
        return solve(*args)

    ls.solve_products = failing
    engines = []
    try:
        passes_case("gpt2", 1, made=engines.append)
    except Exception as err:  # noqa: BLE001 - what the test checks
        ls.solve_products = solve
        then = []
        for action in (lambda: ds_bitter7.get_pruner(engines[0]).prune_to(0.8),  # no further event on it
                       lambda: engines[0].save_checkpoint(tempfile.mkdtemp())):  # nor a checkpoint of it
            try:
                action()
                then.append("ran")
            except Exception as err2:  # noqa: BLE001
                then.append(f"{type(err2).__name__}: {err2}")
        return f"{type(err).__name__}: {err}", then
    finally:
        ls.solve_products = solve
    return "no error", None


def test_a_chunk_failing_after_others_names_the_groups_already_refit():
    """With ``layers_per_pass``, a later chunk's failure leaves the chunks before it applied: the
    error says which groups are changed (the last block's MLP first) and which are not; a failure in
    the first chunk changed nothing and is raised as it is."""
    first, then = run_distributed(failing_chunk_case, 1, 1, timeout=90)[0]
    assert first == "ValueError: injected" and then == ["ran", "ran"], (first, then)  # nothing changed: it may run
    for second, then in run_distributed(failing_chunk_case, 2, 2, timeout=120):
        assert second == ("PartlyCompensated: least-squares compensation failed (ValueError: "
                          "injected) after changing (some of) the out projections or biases of ['layers.1.mlp']; "
                          "those of ['layers.0.mlp', 'layers.0.attn', 'layers.1.attn'] are unchanged: reload the "
                          "model or checkpoint before using or pruning it"), second
        for what, message in zip(("prune", "save a checkpoint"), then):
            assert message.startswith(f"RuntimeError: ds_bitter7: cannot {what}: an earlier pruning event failed "
                                      "after changing weights (least-squares compensation"), message
