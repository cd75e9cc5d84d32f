"""Score ``obs``: the greedy structured Optimal Brain Surgeon order.

``removal_order`` (incremental inverse updates) is compared with a brute-force reference that, at
every step, refits the next layer from scratch for every candidate unit (the Schur complement of
the damped covariance) and removes the cheapest. Then, on 2 ranks under ZeRO-2, the pruner's
scores equal the single-process order computed from plain-torch statistics, and both ranks prune
the same prefix of it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import VOCAB, ds_config, known, out_module_inputs, tiny_model
from workers import train_steps

import ds_bitter7
from ds_bitter7.calibration import UnitStats
from ds_bitter7.comm import Communicator
from ds_bitter7.config import StructureName
from ds_bitter7.obs import output_fisher, removal_order
from ds_bitter7.structures import unit_groups

RIDGE = 1e-3


def calibration(n: int = 6, seed: int = 7) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def stats_of(model, kinds, data) -> Dict[str, UnitStats]:
    x = out_module_inputs(model, data, kinds)
    return {k: UnitStats(v.shape[0], v.mean(0), v.var(0, unbiased=False), v.T @ v / v.shape[0])
            for k, v in x.items()}


def refit_error(cov: torch.Tensor, w: torch.Tensor, removed: Set[int], ridge: float, scale: float,
                d: Optional[torch.Tensor] = None) -> float:
    """Output error after removing features ``removed`` and refitting the rest on the damped
    covariance ``A = cov + ridge * scale * I``: ``tr(W_R^T (A_RR - A_RK A_KK^-1 A_KR) W_R D)``
    (``D = diag(d)``, the identity by default)."""
    if not removed:
        return 0.0
    f = cov.shape[0]
    a = cov + ridge * scale * torch.eye(f, dtype=torch.float64)
    r = torch.tensor(sorted(removed))
    k = torch.tensor([i for i in range(f) if i not in removed], dtype=torch.long)
    schur = a[r][:, r]
    if k.numel():
        schur = schur - a[r][:, k] @ torch.linalg.solve(a[k][:, k], a[k][:, r])
    w_r = w[r]
    return float(((w_r * (schur @ w_r)) * (1.0 if d is None else d)).sum())


def brute_force_order(groups, model, stats, masks, ridge: float,
                      weights: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Greedy by total refit error (each output's squared error times ``weights[key]``), recomputed
    from scratch for every candidate of every group."""
    data = []
    for g in groups:
        w = model.get_parameter(g.out_weight).detach().double()
        w = w if g.out_in_dim == 0 else w.T  # [F, out]
        st = stats[g.key]
        cov = st.second_moment - torch.outer(st.mean, st.mean)
        feats = [set((g.feature_units == u).nonzero().flatten().tolist()) for u in range(g.n_units)]
        gone = {f for u in (~masks[g.key]).nonzero().flatten().tolist() for f in feats[u]}
        scale = float(cov.diagonal()[[f for f in range(cov.shape[0]) if f not in gone]].mean())
        data.append((cov, w, feats, scale, None if weights is None else weights[g.key]))
    order = {g.key: torch.zeros(g.n_units, dtype=torch.float64) for g in groups}
    removed = [set() for _ in groups]
    alive = [set(range(g.n_units)) for g in groups]
    step = 0
    for i, g in enumerate(groups):  # already pruned: first, in index order
        for u in (~masks[g.key]).nonzero().flatten().tolist():
            order[g.key][u] = step
            step += 1
            removed[i] |= data[i][2][u]
            alive[i].discard(u)
    while any(alive):
        best = None
        for i, (cov, w, feats, scale, d) in enumerate(data):
            base = refit_error(cov, w, removed[i], ridge, scale, d)
            for u in sorted(alive[i]):
                cost = refit_error(cov, w, removed[i] | feats[u], ridge, scale, d) - base
                if best is None or cost < best[0]:  # ties: the first group, then the first unit
                    best = (cost, i, u)
        _, i, u = best
        order[groups[i].key][u] = step
        step += 1
        removed[i] |= data[i][2][u]
        alive[i].discard(u)
    return order


@pytest.mark.parametrize("family, kind, pruned", [
    ("gpt2", "mlp_neuron", False), ("llama", "mlp_neuron", True),
    ("gpt2", "attention_head", True), ("llama", "attention_head", False)])
def test_removal_order_equals_brute_force_greedy(family, kind, pruned):
    model = tiny_model(family)
    kinds = [StructureName(kind)]
    groups = unit_groups(model, kinds)
    stats = stats_of(model, kinds, calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    if pruned:  # units pruned by an earlier event go first and are out of the refit
        masks[groups[0].key][[0, 1]] = False
    got = removal_order(groups, model, stats, masks, RIDGE)
    want = brute_force_order(groups, model, stats, masks, RIDGE)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), (key, got[key], want[key])
    assert sorted(torch.cat(list(got.values())).tolist()) == list(range(sum(g.n_units for g in groups)))


@pytest.mark.parametrize("family, kind", [("gpt2", "mlp_neuron"), ("llama", "attention_head")])
def test_weighted_order_equals_brute_force_greedy(family, kind):
    """``bitter7_obs``: each output's squared error weighted (``output_weights``); the greedy equals
    the brute force on the weighted error, and the weights change the order."""
    model = tiny_model(family)
    kinds = [StructureName(kind)]
    groups = unit_groups(model, kinds)
    stats = stats_of(model, kinds, calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    g = torch.Generator().manual_seed(3)
    weights = {}
    for grp in groups:
        out = model.get_parameter(grp.out_weight).shape[1 if grp.out_in_dim == 0 else 0]
        scale = 10.0 ** torch.randn(1, generator=g, dtype=torch.float64)  # across groups too
        weights[grp.key] = torch.rand(out, generator=g, dtype=torch.float64).pow(4) * scale
    got = removal_order(groups, model, stats, masks, RIDGE, output_weights=weights)
    want = brute_force_order(groups, model, stats, masks, RIDGE, weights)
    for key in want:
        assert torch.equal(got[key], want[key]), (key, got[key], want[key])
    plain = removal_order(groups, model, stats, masks, RIDGE)
    assert any(not torch.equal(plain[k], got[k]) for k in got)


def test_output_fisher_divides_column_sums_by_the_feature_energy():
    model = tiny_model("gpt2")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = stats_of(model, [StructureName.mlp_neuron], calibration())
    n_out = model.config.n_embd  # Conv1D c_proj: [n_inner, n_embd]
    sums = {grp.key: torch.arange(1.0, n_out + 1.0, dtype=torch.float64) for grp in groups}
    got = output_fisher(groups, sums, stats)
    for grp in groups:
        x = out_module_inputs(model, calibration(), [StructureName.mlp_neuron])[grp.key]
        assert torch.allclose(got[grp.key], sums[grp.key] / x.square().mean(0).sum(), rtol=1e-10)
    dead = {grp.key: UnitStats(1, torch.zeros(grp.n_units, dtype=torch.float64),
                               torch.zeros(grp.n_units, dtype=torch.float64)) for grp in groups}
    assert all(bool(v.eq(0).all()) for v in output_fisher(groups, sums, dead).values())
    # active features but no second moment (a layer the optimizer never updated): NaN, and the
    # order is all NaN (the event prunes nothing) instead of every unit of that layer being free
    zero = {**sums, groups[0].key: torch.zeros(n_out, dtype=torch.float64)}
    weights = output_fisher(groups, zero, stats)
    assert bool(weights[groups[0].key].isnan().all()) and not bool(weights[groups[1].key].isnan().any())
    masks = {grp.key: torch.ones(grp.n_units, dtype=torch.bool) for grp in groups}
    order = removal_order(groups, model, stats, masks, RIDGE, output_weights=weights)
    assert all(bool(v.isnan().all()) for v in order.values())


def test_a_unit_the_others_reproduce_goes_first():
    """Feature 5 = 2 x feature 1 - feature 2 on every row, and these three carry the largest weights
    (the largest output energy: fluctuation and magnitude would remove them last). The refit
    reproduces any one of them from the other two, so obs removes one of them first."""
    model = tiny_model("gpt2")
    group = unit_groups(model, [StructureName.mlp_neuron])[0]
    x = torch.randn(500, group.n_units, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 5] = 2 * x[:, 1] - x[:, 2]
    with torch.no_grad():
        model.get_parameter(group.out_weight)[[1, 2, 5]] *= 100.0  # GPT-2 Conv1D: row f is feature f
    stats = {group.key: UnitStats(500, x.mean(0), x.var(0, unbiased=False), x.T @ x / 500)}
    mask = {group.key: torch.ones(group.n_units, dtype=torch.bool)}
    for ridge in (0.0, 1e-6):
        order = removal_order([group], model, stats, mask, ridge=ridge)[group.key]
        assert int(order.argmin()) in (1, 2, 5), ridge


# -- 2 ranks, ZeRO-2 -----------------------------------------------------------------------------
def obs_on_ranks() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model("llama")
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron", "attention_head"], "score": "obs",
                                "schedule": {"start_step": 1000, "end_step": 1000}, "min_units_per_layer": 0,
                                "bias_compensation": {"enabled": True, "mode": "mean"}})
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calibration()[rank::world])
    pruner = ds_bitter7.get_pruner(engine)
    scores = pruner.unit_scores()
    event = pruner.prune_to(0.5)
    return {"scores": scores, "masks": {k: m.clone() for k, m in pruner.masks.items()},
            "skipped": event["skipped"]}


def test_two_ranks_score_the_single_process_order_and_prune_its_prefix():
    results = run_distributed(obs_on_ranks, 2, timeout=180)
    model = tiny_model("llama")
    for kind in (StructureName.mlp_neuron, StructureName.attention_head):
        groups = unit_groups(model, [kind])
        stats = stats_of(model, [kind], calibration())  # mean compensation alone gathers no matrix
        ones = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
        want = removal_order(groups, model, stats, ones, RIDGE)
        n = sum(g.n_units for g in groups)
        for res in results:
            assert res["skipped"] == []
            for g in groups:
                assert torch.equal(res["scores"][g.key], want[g.key]), (g.key, res["scores"][g.key], want[g.key])
                # the first floor(n / 2) of the joint order are pruned, and nothing else
                assert torch.equal(~res["masks"][g.key], want[g.key] < math.floor(0.5 * n)), g.key
    assert all(torch.equal(results[0]["masks"][k], results[1]["masks"][k]) for k in results[0]["masks"])


def bitter7_obs_on_ranks(family: str) -> dict:
    """One training step (Adam state exists), then known ``exp_avg_sq`` in every rank's share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(family)
    cfg = ds_config(2, "fp32", {"structures": ["mlp_neuron", "attention_head"], "score": "bitter7_obs",
                                "schedule": {"start_step": 1000, "end_step": 1000}, "min_units_per_layer": 0,
                                "bias_compensation": {"enabled": False}})  # Llama keeps no output biases
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calibration()[rank::world])
    pruner = ds_bitter7.get_pruner(engine)
    train_steps(engine, 1)
    with torch.no_grad():
        for name, frag in pruner.access.fragments.items():
            v = known(name, frag.param.shape)[1].view(-1)
            pruner.access.state(frag).copy_(v[frag.start:frag.start + frag.numel])
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    scores = pruner.unit_scores()
    pruner.prune_to(0.5)
    return {"scores": scores, "masks": {k: m.clone() for k, m in pruner.masks.items()}, "state": state}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bitter7_obs_on_two_ranks_weights_by_the_gathered_exp_avg_sq(family):
    """Each rank sums ``exp_avg_sq`` of the next layer over the range it owns; after the all-reduce
    the order equals the single-process greedy weighted by the full tensor's column sums."""
    results = run_distributed(bitter7_obs_on_ranks, 2, family, timeout=180)
    model = tiny_model(family)
    model.load_state_dict(results[0]["state"])
    for kind in (StructureName.mlp_neuron, StructureName.attention_head):
        groups = unit_groups(model, [kind])
        stats = stats_of(model, [kind], calibration())
        ones = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
        sums = {}
        for g in groups:  # sum over the next layer's input features (Conv1D [F, out], Linear [out, F])
            v = known(g.out_weight, model.get_parameter(g.out_weight).shape)[1].double()
            sums[g.key] = v.sum(0 if g.out_in_dim == 0 else 1)
        weights = output_fisher(groups, sums, stats)
        want = removal_order(groups, model, stats, ones, RIDGE, output_weights=weights)
        if kind == StructureName.mlp_neuron:  # the weights matter (4 Llama KV groups may keep their order)
            plain = removal_order(groups, model, stats, ones, RIDGE)
            assert any(not torch.equal(plain[g.key], want[g.key]) for g in groups)
        n = sum(g.n_units for g in groups)
        for res in results:
            for g in groups:
                assert torch.equal(res["scores"][g.key], want[g.key]), (g.key, res["scores"][g.key])
                assert torch.equal(~res["masks"][g.key], want[g.key] < math.floor(0.5 * n)), g.key


def test_large_types_remove_blocks_of_the_cheapest(monkeypatch):
    """Past ``STEPS`` units a step removes ceil(n / STEPS) at once; with one step for all, the order is
    each unit's cost alone (its refit error from scratch), ascending."""
    from ds_bitter7 import obs

    model = tiny_model("llama")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = stats_of(model, [StructureName.mlp_neuron], calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    monkeypatch.setattr(obs, "STEPS", 1)
    got = torch.cat(list(removal_order(groups, model, stats, masks, RIDGE).values()))
    alone = []
    for g in groups:
        w = model.get_parameter(g.out_weight).detach().double().T
        cov = stats[g.key].second_moment - torch.outer(stats[g.key].mean, stats[g.key].mean)
        alone += [refit_error(cov, w, {u}, RIDGE, float(cov.diagonal().mean())) for u in range(g.n_units)]
    want = torch.empty(len(alone), dtype=torch.float64)
    want[torch.sort(torch.tensor(alone), stable=True).indices] = torch.arange(len(alone), dtype=torch.float64)
    assert torch.equal(got, want)


def test_the_joint_order_interleaves_each_layers_own_greedy():
    """A layer's greedy does not depend on the other layers: ``per_layer`` gives each layer's own
    order, and the joint order, restricted to one layer, is that same order."""
    model = tiny_model("gpt2")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = stats_of(model, [StructureName.mlp_neuron], calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    both = removal_order(groups, model, stats, masks, RIDGE, per_layer=True)
    joint = removal_order(groups, model, stats, masks, RIDGE)
    for g in groups:
        assert torch.equal(both[g.key], removal_order([g], model, stats, masks, RIDGE)[g.key]), g.key
        assert torch.equal(joint[g.key].argsort(), both[g.key].argsort()), g.key
    first = joint[groups[0].key] < groups[0].n_units  # the joint prefix of one layer's length
    assert 0 < int(first.sum()) < groups[0].n_units  # takes from both layers


def random_stats(groups, rows: int = 2000, seed: int = 0) -> Dict[str, UnitStats]:
    gen = torch.Generator().manual_seed(seed)
    stats = {}
    for g in groups:
        x = torch.randn(rows, g.n_units, generator=gen, dtype=torch.float64)
        stats[g.key] = UnitStats(rows, x.mean(0), x.var(0, unbiased=False), x.T @ x / rows)
    return stats


def test_equal_keys_go_to_the_first_layer_first():
    """Two identical layers tie at every step: in the joint order each unit of layer 0 comes before
    its copy in layer 1 (ties by layer, then by place in the layer's own order)."""
    model = tiny_model("gpt2")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    with torch.no_grad():
        model.get_parameter(groups[1].out_weight).copy_(model.get_parameter(groups[0].out_weight))
    stats = random_stats(groups[:1])
    stats[groups[1].key] = stats[groups[0].key]
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    own = removal_order(groups, model, stats, masks, RIDGE, per_layer=True)
    assert torch.equal(own[groups[0].key], own[groups[1].key])
    joint = removal_order(groups, model, stats, masks, RIDGE)
    assert bool((joint[groups[0].key] < joint[groups[1].key]).all())
    for g in groups:
        assert torch.equal(joint[g.key].argsort(), own[g.key].argsort())


def test_an_event_refits_about_the_units_it_prunes(monkeypatch):
    """Layer 0 is nearly free, so a 5% event prunes only there: the other layers, whose next keys
    are far above, must not be advanced (each layer's matrices refit once per unit ordered)."""
    from ds_bitter7 import obs

    model = tiny_model("gpt2", layers=4)
    groups = unit_groups(model, [StructureName.mlp_neuron])
    with torch.no_grad():
        model.get_parameter(groups[0].out_weight).mul_(1e-3)
    stats = random_stats(groups)
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    ordered = []
    remove = obs._GroupState.remove

    def counting(self, units):
        ordered.append(len(units))
        return remove(self, units)

    monkeypatch.setattr(obs._GroupState, "remove", counting)
    order = removal_order(groups, model, stats, masks, RIDGE, fraction=0.05)
    limit = math.floor(0.05 * sum(g.n_units for g in groups))
    assert bool((order[groups[0].key] < limit).sum() == limit)
    assert sum(ordered) == limit


def test_per_layer_blocks_count_each_layers_units(monkeypatch):
    """In block mode ``per_layer`` steps by a layer's own count (96 units, STEPS 8: 12 per step),
    the joint greedy by the type's (192: 24 per step), so their orders differ."""
    from ds_bitter7 import obs

    model = tiny_model("gpt2")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = stats_of(model, [StructureName.mlp_neuron], calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    monkeypatch.setattr(obs, "STEPS", 8)
    both = removal_order(groups, model, stats, masks, RIDGE, per_layer=True)
    for g in groups:
        assert torch.equal(both[g.key], removal_order([g], model, stats, masks, RIDGE)[g.key]), g.key
    joint = removal_order(groups, model, stats, masks, RIDGE)
    assert any(not torch.equal(joint[g.key].argsort(), both[g.key].argsort()) for g in groups)


def test_ridge_zero_with_fewer_rows_than_features_is_the_floored_greedy():
    """32 calibration rows for 96 features: at ridge 0 the damping is floored at 1e-6 (below it the
    running inverse loses every digit); the order is the brute-force greedy at that damping."""
    model = tiny_model("gpt2")
    kinds = [StructureName.mlp_neuron]
    groups = unit_groups(model, kinds)[:1]
    stats = stats_of(model, kinds, calibration(n=1))
    assert stats[groups[0].key].count < groups[0].n_units
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    got = removal_order(groups, model, stats, masks, 0.0)
    want = brute_force_order(groups, model, stats, masks, 1e-6)
    assert torch.equal(got[groups[0].key], want[groups[0].key])


@pytest.mark.parametrize("per_layer", [False, True])
def test_an_event_orders_only_the_prefix_it_prunes(per_layer):
    """With ``fraction`` the first floor(fraction * n) are the full greedy's, the rest a permutation."""
    model = tiny_model("llama")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = stats_of(model, [StructureName.mlp_neuron], calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    masks[groups[1].key][3] = False  # pruned by an earlier event: still first
    full = removal_order(groups, model, stats, masks, RIDGE, per_layer=per_layer)
    part = removal_order(groups, model, stats, masks, RIDGE, per_layer=per_layer, fraction=0.3)
    sets = [[g] for g in groups] if per_layer else [groups]
    for gs in sets:
        f, p = (torch.cat([o[g.key] for g in gs]) for o in (full, part))
        k = math.floor(0.3 * f.numel())
        assert torch.equal(p < k, f < k) and torch.equal(p[f < k], f[f < k])
        assert sorted(p.tolist()) == list(range(f.numel()))


@pytest.mark.parametrize("min_keep", [1, 2])
def test_the_prefix_reaches_past_units_a_global_threshold_protects(min_keep):
    """Layer 0 is nearly free, so the greedy prefix empties it, but select_units keeps its last
    ``min_keep``: the event then prunes that many more units, which must still be the greedy's.
    In layer 1 units 0 and 1 are copies with large weights: the greedy takes one, then keeps the
    other to the end; ranked by their costs at a stopping point, both would look free."""
    from ds_bitter7.threshold import select_units

    model = tiny_model("gpt2")
    groups = unit_groups(model, [StructureName.mlp_neuron])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.get_parameter(groups[0].out_weight).mul_(1e-3)
        model.get_parameter(groups[1].out_weight)[[0, 1]] *= 10.0
    stats = {}
    for i, g in enumerate(groups):
        x = torch.randn(2000, g.n_units, generator=gen, dtype=torch.float64)
        if i == 1:
            x[:, 1] = x[:, 0]
        stats[g.key] = UnitStats(2000, x.mean(0), x.var(0, unbiased=False), x.T @ x / 2000)
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    layers = torch.cat([torch.full((g.n_units,), i) for i, g in enumerate(groups)])
    none = torch.zeros(len(layers), dtype=torch.bool)

    def pruned(order):
        return select_units(torch.cat([order[g.key] for g in groups]), layers, none, 0.5, False, min_keep)

    full = pruned(removal_order(groups, model, stats, masks, RIDGE))
    event = pruned(removal_order(groups, model, stats, masks, RIDGE, fraction=0.5, min_keep=min_keep))
    assert torch.equal(event, full)
    assert not bool(full[groups[0].n_units:][:2].all())  # one of the copies stays


ORDER_CASES = {"full": {}, "event": {"fraction": 0.6, "min_keep": 2},
               "per_layer": {"per_layer": True, "fraction": 0.6}}


def order_inputs(layers: int):
    model = tiny_model("gpt2", layers=layers)
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = stats_of(model, [StructureName.mlp_neuron], calibration())
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    masks[groups[-1].key][2] = False  # pruned by an earlier event
    return model, groups, stats, masks


def order_on_ranks(layers: int) -> Dict[str, Dict[str, torch.Tensor]]:
    model, groups, stats, masks = order_inputs(layers)
    comm = Communicator()
    return {name: removal_order(groups, model, stats, masks, RIDGE, comm=comm, **kw) for name, kw in ORDER_CASES.items()}


@pytest.mark.parametrize("layers, world", [(4, 2), (4, 3), (2, 3)])
def test_ranks_share_the_groups_and_agree_with_one_process(layers, world):
    """Group ``i`` runs on rank ``i % world`` (with 2 layers on 3 ranks one rank has none); after the
    rounds and the exchange every rank holds the single-process order, for the full order, an
    event's prefix with a per-layer minimum, and ``per_layer``."""
    results = run_distributed(order_on_ranks, world, layers, timeout=180)
    model, groups, stats, masks = order_inputs(layers)
    for name, kw in ORDER_CASES.items():
        want = removal_order(groups, model, stats, masks, RIDGE, **kw)
        for rank, res in enumerate(results):
            for g in groups:
                assert torch.equal(res[name][g.key], want[g.key]), (name, rank, g.key)


def order_failing_on_rank(bad_rank: int) -> str:
    from ds_bitter7 import obs

    model, groups, stats, masks = order_inputs(4)
    if dist.get_rank() == bad_rank:
        def broken(*args, **kwargs):
            raise ValueError("no memory for this group")
        obs._state = broken
    try:
        removal_order(groups, model, stats, masks, RIDGE, comm=Communicator(), fraction=0.5)
    except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
        return f"{type(e).__name__}: {e}"
    return "returned"


def test_a_group_failing_on_one_rank_fails_every_rank():
    results = run_distributed(order_failing_on_rank, 2, 1, timeout=120)
    assert results[1] == "ValueError: no memory for this group"
    assert results[0].startswith("RuntimeError") and "another rank" in results[0], results[0]
