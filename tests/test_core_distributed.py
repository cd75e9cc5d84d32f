"""README Guarantees 1, 2, 3, 5 and 6 on emulated ranks (CPU, gloo, real DeepSpeed).

Each spawned world runs several (ZeRO stage, dtype) cases; every result is compared with a
single-process reference computed from full tensors in plain torch (tests/reference.py).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import workers
from distributed import run_distributed
from reference import reference_masks, reference_unit_scores, reference_unstructured, standardized, tiny_model

from ds_bitter7.structures import unstructured_params


def _fp16_supported() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (CPUs with
    AVX512-FP16 or AMX); elsewhere its engine refuses it ("Type fp16 is not supported on your
    device"), as on an AMD EPYC without AVX-512 seen here."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


BOTH = {"structures": ["mlp_neuron", "attention_head"]}
CASES = [(0, "fp32", BOTH), (1, "fp32", BOTH), (2, "fp32", BOTH),
         (1, "bf16_optimizer", BOTH), (1, "bf16", BOTH), (2, "bf16", BOTH),
         (2, "fp32", {**BOTH, "scope": "per_layer", "score": "fisher"}),
         (2, "fp32", {**BOTH, "scope": "standardized"}),
         (1, "fp32", {**BOTH, "score": "magnitude"}),
         (2, "bf16", {**BOTH, "mask_upkeep": "state"})]


def _kinds(bitter7):
    return [{"mlp_neuron": "mlp", "attention_head": "attn"}[s] for s in bitter7["structures"]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_masks_scores_and_zeros_match_reference(family, world_size):
    _check_against_reference(family, world_size, CASES)


@pytest.mark.parametrize("family", ["bitter7_gpt2", "bitter7_llama"])
def test_exported_models_prune_again(family):
    """An exported model whose blocks have different widths (``scope: global``) trains and prunes
    again under ZeRO: each block's units are read from its own weights, and the guarantees hold."""
    assert tiny_model(family).config.model_type == family
    _check_against_reference(family, 2, [CASES[2], CASES[5], CASES[6]])


def test_placeholder_units_of_an_export_stay_outside_the_fraction():
    """A layer pruned whole exports with one all-zero unit, which its config names: pruned again,
    that unit is pruned (and zero) from the start and counts for no fraction: 2 of the 4 live heads,
    not the placeholder and 1 live head (floor(0.5 * 5) units), nor for the reported sparsity."""
    for res in run_distributed(workers.placeholder_case, 2):
        assert res["placeholder_units"] == ["layers.1.attn"]
        assert res["attach"]["layers.1.attn"].tolist() == [False] and res["attach"]["layers.0.attn"].all()
        assert res["masks"]["layers.1.attn"].tolist() == [False]
        assert int((~res["masks"]["layers.0.attn"]).sum()) == 2  # floor(0.5 * 4 live heads)
        assert res["sparsity"] == {"mlp_neuron": 0.5, "attention_head": 0.5}
        rows = {r["key"]: r for r in res["report"]}
        assert (rows["layers.1.attn"]["units_kept"], rows["layers.1.attn"]["units_total"]) == (0, 0)
        assert "placeholder" in res["table"]
        assert res["zero_at_attach"] == {"master": True, "model": True}
        assert res["zero"] == {"master": True, "moments": True, "model": True}


@pytest.mark.skipif(not _fp16_supported(), reason="DeepSpeed has no fp16 on this CPU (oneDNN without AVX512-FP16 or AMX)")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fp16_masks_scores_and_zeros_match_reference(family):
    _check_against_reference(family, 2, [(2, "fp16", BOTH)])


def _check_against_reference(family, world_size, cases):
    results = run_distributed(workers.core_suite, world_size, family, cases)
    model = tiny_model(family)
    for i, (stage, dtype, bitter7) in enumerate(cases):
        case = f"{family} stage {stage} {dtype} {bitter7}"
        score = bitter7.get("score", "bitter7")
        ref_scores = reference_unit_scores(family, model, _kinds(bitter7), score)
        scope = bitter7.get("scope", "global")
        ref_masks = reference_masks(ref_scores, 0.5, scope)
        thr_scores = standardized(ref_scores) if scope == "standardized" else ref_scores  # thresholds in z units
        for rank, res in enumerate(r[i] for r in results):
            # Invariant 1: identical scores and masks on every rank, equal to the reference.
            assert res["scores"].keys() == ref_scores.keys(), case
            for key, ref in ref_scores.items():
                assert res["scores"][key].dtype.is_floating_point
                assert res["scores"][key].double().allclose(ref, rtol=1e-10, atol=0), (case, key)
                assert res["masks"][key].equal(ref_masks[key]), (case, rank, key)
            # Invariant 2: exactly floor(0.5 * n) units per type, the threshold equals the reference.
            for kind, name in (("mlp", "mlp_neuron"), ("attn", "attention_head")):
                keys = [k for k in ref_masks if k.endswith(kind)]
                pruned = sum(int((~res["masks"][k]).sum()) for k in keys)
                total = sum(ref_masks[k].numel() for k in keys)
                if scope == "per_layer":
                    assert pruned == sum(math.floor(0.5 * ref_masks[k].numel()) for k in keys)
                else:
                    assert pruned == math.floor(0.5 * total), case
                    ref_thr = max(float(thr_scores[k][~ref_masks[k]].max()) for k in keys if not ref_masks[k].all())
                    assert res["event"]["thresholds"][name] == pytest.approx(ref_thr, rel=1e-10)
            # Invariant 3: pruned units are exactly zero after two more steps.
            assert res["zero"] == {"master": True, "moments": True, "model": True}, (case, rank, res["zero"])
            # Invariant 5: only O(n_units) numbers move; nothing like a full tensor.
            n_units = sum(m.numel() for m in ref_masks.values())
            limit = 8 * n_units + 64 if world_size > 1 else 0
            assert res["collective_bytes"] <= limit, (case, res["collective_bytes"], res["collective_calls"])
            assert res["collective_bytes"] < res["state_bytes"] / 10 or world_size == 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("stage", [0, 2])
def test_unstructured_exact_kth_matches_reference(stage, world_size):
    bitter7 = {"structures": ["unstructured"]}
    results = run_distributed(workers.core_suite, world_size, "gpt2", [(stage, "fp32", bitter7)])
    model = tiny_model("gpt2")
    names = unstructured_params(model)
    ref = reference_unstructured(model, names, "bitter7", 0.5)
    params = dict(model.named_parameters())
    got = {n: torch_zeros(params[n].numel()) for n in names}
    for res in (r[0] for r in results):
        assert res["unstructured_zero"]
        for n, (start, pruned) in res["unstructured"].items():
            got[n][start:start + pruned.numel()] = pruned
        # The only traffic: a few 256-bin histograms and per-parameter tie counts.
        if world_size > 1 and stage > 0:
            assert res["collective_bytes"] <= 4 * 256 * 8 + 2 * len(names) * world_size * 8 + 64
    for n in names:
        assert got[n].equal(ref[n]), n
    assert sum(int(m.sum()) for m in got.values()) == math.floor(0.5 * sum(m.numel() for m in got.values()))


@pytest.mark.parametrize("stage, dtype", [(2, "fp32"), (1, "bf16")])
def test_scheduled_unstructured_event_zeroes_every_ranks_model_at_once(stage, dtype):
    assert all(run_distributed(workers.scheduled_unstructured_two_groups, 2, stage, dtype))


@pytest.mark.parametrize("stage", [0, 2])
def test_frozen_unit_parameters_and_non_adam_optimizers_fail_early(stage):
    results = run_distributed(workers.setup_errors, 2, stage, timeout=120)
    if stage == 2:
        assert min(r["fragments"] for r in results) == 0  # a rank without fragments fails too, no hang
    for rank, res in enumerate(results):
        assert "transformer.h.0.mlp.c_fc.weight is frozen" in res["frozen"], res
        expect = "exp_avg_sq' does not exist" if res["fragments"] else "failed on another rank"
        assert expect in res["sgd"], (rank, res)
        assert res["outside"] == ("ds_bitter7: transformer.h.0.attn.c_attn.bias (and 5 more) is in no optimizer param "
                                  "group but belongs to units bitter7 prunes: pass it to the optimizer "
                                  "(model_parameters), or leave its structure type out of bitter7.structures"), res
        half = res["half_adam"]  # a weight's (the first fragment, a bias, has it), or another rank's
        assert re.search(r"'exp_avg_sq' does not exist for transformer\.h\.\d\.mlp\.c_\w+\.weight", half) \
            or "failed on another rank" in half, (rank, res)


def test_prune_to_takes_numbers_and_warns_when_the_floor_holds_units_back():
    res = run_distributed(workers.prune_to_inputs, 2)[0]
    assert type(res["fraction"]) is float and res["fraction"] == 0.25 and res["json"]
    assert res["sparsity"] == {"mlp_neuron": 0.0}
    assert any("min_units_per_layer 1000 keeps 192 units of 192; 0.0000 pruned, not the 0.2500 asked" in w
               for w in res["warnings"]), res["warnings"]
    assert len(res["errors"]) == 5 and all("prune_to: fraction must be a number in [0, 1), got" in e
                                           for e in res["errors"]), res["errors"]


def torch_zeros(n):
    import torch

    return torch.zeros(n, dtype=torch.bool)


@pytest.mark.parametrize("world_size", [2, 3])
def test_schedule_reaches_target_and_units_stay_pruned(world_size):
    bitter7 = {"structures": ["mlp_neuron"], "target_sparsity": 0.75,
               "schedule": {"start_step": 2, "end_step": 8, "frequency": 2, "shape": "cubic"}}
    results = run_distributed(workers.schedule_run, world_size, "gpt2", 2, bitter7, 10)
    for res in results:
        assert [e["step"] for e in res["events"]] == [2, 4, 6, 8]
        fractions = [e["fraction"] for e in res["events"]]
        assert fractions == pytest.approx([0.75 * p ** 3 for p in (0, 1 / 3, 2 / 3, 1)])
        kept = [res["masks"][k] for k in sorted(res["masks"])]
        assert sum(int((~m).sum()) for m in kept) == math.floor(0.75 * sum(m.numel() for m in kept))
        assert res["zero"] == {"master": True, "moments": True, "model": True}
        assert res["step_count"] == 10
    for res in results[1:]:
        assert all(res["masks"][k].equal(results[0]["masks"][k]) for k in res["masks"])


@pytest.mark.parametrize("family, dtype", [("gpt2", "fp32"), ("llama", "bf16")])
def test_pruned_units_get_exactly_zero_gradients(family, dtype):
    """Guarantee 3: once a neuron or head is pruned (weights and bias zero, compensation folded into
    the next layer), backward gives its parameters exactly zero gradient on every rank, so
    gradient clipping's norm counts only kept units."""
    for res in run_distributed(workers.pruned_unit_gradients, 2, family, dtype):
        assert res["pruned"] > 0
        assert res["pruned_zero"] and res["kept_nonzero"], res


def test_nan_scores_prune_nothing_on_every_rank():
    results = run_distributed(workers.nan_event, 2, "gpt2")
    for res in results:
        assert res["skipped"] == ["mlp_neuron"]
        assert res["kept"] == {"layers.0.mlp": 96, "layers.1.mlp": 96}


@pytest.mark.parametrize("where", ["scoring", "unstructured", "mean"])
def test_a_failure_of_one_ranks_own_event_work_fails_every_rank(where):
    first, last = run_distributed(workers.local_failure, 2, where, timeout=90)
    assert last == "injected: out of memory", last
    assert "failed on another rank" in first, first


def test_an_event_that_failed_before_zeroing_can_be_run_again():
    clean, retried = (run_distributed(workers.retry_after_failure, 2, fail, timeout=90) for fail in (False, True))
    for a, b in zip(clean, retried):
        assert a["units"] == b["units"] > 0 and a["sparsity"] == b["sparsity"]
        for key in ("masks", "unstructured", "params"):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_a_state_pruned_beyond_the_target_is_said_at_resume():
    """A run resumed with a lower target_sparsity than its checkpoint reached kept the pruned
    units without a word (they never come back)."""
    warnings = run_distributed(workers.state_beyond_target, 1)[0]
    assert any("pruned to 0.5000, beyond this config's target_sparsity 0.3000" in w for w in warnings), warnings


@pytest.mark.parametrize("stage", [0, 2])
def test_client_torch_adamw(stage):
    results = run_distributed(workers.client_optimizer_case, 2, "llama", stage)
    model = tiny_model("llama")
    ref = reference_masks(reference_unit_scores("llama", model, ["mlp"], "bitter7"), 0.5)
    for res in results:
        assert res["zero"] == {"master": True, "moments": True, "model": True}
        assert res["bias_trained"], res  # the biases initialize added
        for key, mask in ref.items():
            assert res["masks"][key].equal(mask)


def test_configs_that_differ_between_ranks_fail_on_every_rank():
    for res in run_distributed(workers.differing_configs, 2):
        for case in ("target", "disabled"):
            assert res[case] and "the ranks' \"bitter7\" config sections differ" in res[case], res


def test_bad_config_fails_on_every_rank_before_any_collective():
    from reference import ds_config

    cfg = ds_config(2, "fp32", {"target_sparsity": 1.5, "score": "nope", "colour": "red",
                                "schedule": {"start_step": 10, "end_step": 5}})
    results = run_distributed(workers.bad_config, 2, cfg)
    for res in results:
        assert res["calls"] == []
        msg = res["error"]
        for needle in ("bitter7.target_sparsity = 1.5", "bitter7.score = 'nope'", "bitter7.colour = 'red'",
                       "end_step (5) must be >= start_step (10)"):
            assert needle in msg, msg
