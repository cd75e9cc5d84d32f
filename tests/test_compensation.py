"""Bias compensation (README Guarantee 4) on emulated ranks with real DeepSpeed.

- A unit whose activation is constant on the calibration data is removed with no change to the
  logits (fp32, relative error <= 1e-6); without compensation the same removal changes them.
- Removing half of all neurons and heads keeps every block's mean output over the calibration
  data (the union of all ranks' batches) up to float error; without compensation it does not.
ZeRO 0/1/2, GPT-2 (Conv1D, biases) and LLaMA with grouped-query attention (biases added), fp32 and
bf16 under ZeRO and DeepSpeed's BF16_Optimizer (stated tolerance).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import VOCAB, ds_config, small_model

import ds_bitter7
from ds_bitter7.compensation import add_missing_out_biases, local_delta
from ds_bitter7.config import parse_config

BOTH = ["mlp_neuron", "attention_head"]
FP32_TOL = 1e-6
BF16_TOL = 1e-2  # bf16 weights, activations and bias rounding (8 mantissa bits); measured <= 2e-3


def calibration(rank: int, world: int):
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(6)]
    return data[rank::world]  # the same number of batches on every rank for 1, 2 and 3 ranks


def make_constant_neuron(model, family: str, layer: int, i: int) -> None:
    """Neuron i of block ``layer`` gets the same activation for every input (and a low score).

    GPT-2: c_fc column zero, c_fc bias 2 -> gelu(2). LLaMA (mlp_bias): gate and up rows zero,
    biases 1 and 2 -> silu(1) * 2. Its out-projection weights shrink 10x so that the magnitude score
    ranks it last; they stay nonzero, so removing it without compensation moves the logits.
    """
    with torch.no_grad():
        if family == "gpt2":
            mlp = model.transformer.h[layer].mlp
            mlp.c_fc.weight[:, i] = 0
            mlp.c_fc.bias[i] = 2.0
            mlp.c_proj.weight[i, :] *= 0.1
        else:
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[i, :] = 0
            mlp.up_proj.weight[i, :] = 0
            mlp.gate_proj.bias[i] = 1.0
            mlp.up_proj.bias[i] = 2.0
            mlp.down_proj.weight[:, i] *= 0.1


def logits_of(model, data) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x).logits.double() for x in data])


def block_sums(model, pruner, data, inputs=None):
    """Per group: (captured inputs, summed outputs over ``data``) of the MLP block / out projection.

    With ``inputs`` given, the blocks are re-run on those (the inputs before pruning), so only the
    block itself differs. Sums are all-reduced: the mean is over every rank's data.
    """
    modules = {g.key: pruner.model.get_submodule(g.out_module.rsplit(".", 1)[0] if g.key.endswith("mlp")
                                                 else g.out_module) for g in pruner.groups}
    pruner.model.eval()
    sums: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if inputs is None:
            inputs = {k: [] for k in modules}
            hooks = [m.register_forward_pre_hook(lambda mod, a, k=k: inputs[k].append(a[0].clone()))
                     for k, m in modules.items()]
            for x in data:
                pruner.model(x)
            for h in hooks:
                h.remove()
        for k, m in modules.items():
            s = sum(m(x).double().sum((0, 1)) for x in inputs[k])
            dist.all_reduce(s)
            sums[k] = s
    return inputs, sums


# -- runs on every rank ------------------------------------------------------------------------------
def constant_case(family: str, stage: int, compensate: bool) -> float:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model(family, mlp_bias=family == "llama")
    make_constant_neuron(model, family, 1, 5)
    data = calibration(rank, world)
    before = logits_of(model, data)
    bitter7 = {"structures": ["mlp_neuron"], "score": "magnitude",
               "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": compensate}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, "fp32", bitter7), calibration_data=data)
    pruner = ds_bitter7.get_pruner(engine)
    n_total = sum(g.n_units for g in pruner.groups)
    pruner.prune_to(1.5 / n_total)  # exactly one unit: the lowest score
    pruned = {k: (~m).nonzero().flatten().tolist() for k, m in pruner.masks.items() if not m.all()}
    assert pruned == {"layers.1.mlp": [5]}, pruned
    if compensate:
        assert pruner.last_event["compensation"]["units"] == 1
    after = logits_of(model, data)
    return float((after - before).abs().max() / before.abs().max())


def mean_case(family: str, stage: int, dtype: str, compensate: bool) -> Dict[str, float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = small_model(family)
    data = calibration(rank, world)
    bitter7 = {"structures": BOTH, "score": "magnitude", "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": compensate}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, dtype, bitter7), calibration_data=data)
    pruner = ds_bitter7.get_pruner(engine)
    for x in data[:2]:  # bf16: the steps move the fp32 masters off the model's bf16 grid
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    inputs, before = block_sums(model, pruner, data)
    pruner.prune_to(0.5)
    _, after = block_sums(model, pruner, data, inputs)
    assert all(int((~m).sum()) > 0 for m in pruner.masks.values())  # every group lost units
    if compensate:  # the model's bias equals the fp32 master (where owned), rounded as DeepSpeed does
        for g in pruner.groups:
            frag = pruner.access.fragments.get(g.out_bias)
            if frag is not None:
                own = model.get_parameter(g.out_bias).detach().view(-1)[frag.start:frag.start + frag.numel]
                assert torch.equal(own, pruner.access.master(frag).to(own.dtype)), g.key
    return {k: float((after[k] - before[k]).abs().max() / before[k].abs().max()) for k in before}


def in_step_case(family: str, stage: int) -> Dict[str, float]:
    """An event the schedule runs inside ``engine.step()`` (at step 2) calibrates on that step's
    weights: every block's mean output equals the unpruned model's after the same two steps."""
    world, rank = dist.get_world_size(), dist.get_rank()
    data = calibration(rank, world)

    def train(event_step: int):
        model = small_model(family)
        model.eval()  # no dropout: both runs take identical steps up to the event
        bitter7 = {"structures": BOTH, "score": "magnitude", "target_sparsity": 0.5,
                   "schedule": {"start_step": event_step, "end_step": event_step, "frequency": 1},
                   "bias_compensation": {"enabled": True}}
        engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(stage, "fp32", bitter7), calibration_data=data)
        for x in data[:2]:
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        return model, ds_bitter7.get_pruner(engine)

    dense, dense_pruner = train(1000)
    pruned, pruner = train(2)
    assert [e["step"] for e in pruner.events] == [2] and not dense_pruner.events
    inputs, before = block_sums(dense, dense_pruner, data)
    _, after = block_sums(pruned, pruner, data, inputs)
    return {k: float((after[k] - before[k]).abs().max() / before[k].abs().max()) for k in before}


def compensation_suite(cases) -> list:
    run = {"constant": constant_case, "mean": mean_case, "in_step": in_step_case}
    return [run[case[0]](*case[1:]) for case in cases]


CASES = {
    2: [("constant", "gpt2", 0, True), ("constant", "gpt2", 1, True), ("constant", "gpt2", 2, True),
        ("constant", "gpt2", 2, False), ("constant", "llama", 2, True), ("constant", "llama", 1, False),
        ("mean", "gpt2", 0, "fp32", True), ("mean", "gpt2", 2, "fp32", True), ("mean", "gpt2", 2, "fp32", False),
        ("mean", "llama", 1, "fp32", True), ("mean", "llama", 1, "fp32", False),
        ("mean", "gpt2", 2, "bf16", True), ("mean", "gpt2", 2, "bf16", False), ("mean", "llama", 2, "bf16", True),
        ("mean", "llama", 1, "bf16_optimizer", True), ("in_step", "gpt2", 2), ("in_step", "llama", 1)],
    3: [("constant", "llama", 1, True), ("mean", "llama", 2, "fp32", True), ("mean", "gpt2", 1, "fp32", True)],
}


@pytest.mark.parametrize("world_size", [2, 3])
def test_compensation_keeps_outputs(world_size):
    cases = CASES[world_size]
    results = run_distributed(compensation_suite, world_size, cases, timeout=200)
    for i, case in enumerate(cases):
        for rank, res in enumerate(r[i] for r in results):
            if case[0] == "in_step":
                assert max(res.values()) <= FP32_TOL, (case, rank, res)
                continue
            if case[0] == "constant":
                compensate = case[3]
                if compensate:
                    assert res <= FP32_TOL, (case, rank, res)
                else:
                    assert res > 100 * FP32_TOL, (case, rank, res)
                continue
            dtype, compensate = case[3], case[4]
            for key, err in res.items():
                if compensate:
                    assert err <= (FP32_TOL if dtype == "fp32" else BF16_TOL), (case, rank, key, err)
                else:
                    assert err > 10 * BF16_TOL, (case, rank, key, err)


def early_parameter_groups() -> bool:
    """Parameter groups built before initialize adds LLaMA's compensation biases still train them."""
    model = small_model("llama")
    groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    bitter7 = {"structures": BOTH, "schedule": {"start_step": 1000, "end_step": 1000},
               "bias_compensation": {"enabled": True}}
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=groups, config=ds_config(2, "fp32", bitter7),
                                       calibration_data=calibration(0, 1))
    stepped = {id(p) for g in engine.optimizer.bit16_groups for p in g}
    return all(id(model.get_parameter(f"model.layers.{i}.{m}.bias")) in stepped
               for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj"))


def test_compensation_biases_join_parameter_groups_built_early():
    assert run_distributed(early_parameter_groups, 1) == [True]


# -- single process ------------------------------------------------------------------------------------
def test_missing_out_biases_are_added_as_zeros():
    model = small_model("llama")
    x = torch.randint(0, VOCAB, (2, 8))
    before = logits_of(model, [x])
    cfg = parse_config({"bitter7": {"structures": BOTH, "bias_compensation": {"enabled": True}}})
    added = add_missing_out_biases(model, cfg)
    assert sorted(added) == sorted(f"model.layers.{i}.{m}.bias" for i in range(2)
                                   for m in ("mlp.down_proj", "self_attn.o_proj"))
    for name in added:
        bias = model.get_parameter(name)
        assert bias.dtype == torch.float32 and bool((bias == 0).all()) and bias.requires_grad
    assert torch.equal(logits_of(model, [x]), before)
    from ds_bitter7.config import StructureName
    from ds_bitter7.structures import unit_groups

    assert all(g.out_bias in added for g in unit_groups(model, [StructureName(s) for s in BOTH]))
    assert add_missing_out_biases(small_model("gpt2"), cfg) == []  # GPT-2 has its biases


@pytest.mark.parametrize("in_dim", [0, 1])
def test_fragment_partial_products_sum_to_full_product(in_dim):
    """Any split of W_next's flat range into fragments (not row-aligned) sums to W_next @ mu."""
    torch.manual_seed(0)
    n_in, n_out = 12, 7
    shape = (n_in, n_out) if in_dim == 0 else (n_out, n_in)
    weight = torch.randn(shape)
    coef = torch.randn(n_in, dtype=torch.float64)
    group = SimpleNamespace(out_weight="w", out_in_dim=in_dim, feature_units=torch.arange(n_in))
    full = (weight.double().T @ coef) if in_dim == 0 else (weight.double() @ coef)
    cuts = [0, 5, 6, 31, 50, weight.numel()]
    total = torch.zeros(n_out, dtype=torch.float64)
    for a, b in zip(cuts[:-1], cuts[1:]):
        frag = SimpleNamespace(start=a, numel=b - a)
        pruner = SimpleNamespace(model=SimpleNamespace(get_parameter=lambda name: weight),
                                 access=SimpleNamespace(fragments={"w": frag},
                                                        master=lambda f: weight.view(-1)[f.start:f.start + f.numel]))
        total += local_delta(pruner, group, coef)
    assert torch.allclose(total, full, rtol=1e-12, atol=1e-12)

