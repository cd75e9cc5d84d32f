"""Exact selection and the schedule, single process."""

from __future__ import annotations

import pytest
import torch

from ds_bitter7.comm import Communicator
from ds_bitter7.config import parse_config
from ds_bitter7.schedule import sparsity_at, sparsity_reached
from ds_bitter7.threshold import key_to_score, kth_keys, n_to_prune, score_keys, select_units, standardize


def test_floor_is_exact_despite_float_error():
    assert n_to_prune(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    assert n_to_prune(0.5, 7) == 3 and n_to_prune(0.0, 10) == 0
    assert n_to_prune(0.29, 10**8) == 29_000_000  # unstructured sizes: the float error grows with n


def test_ties_prune_the_lower_index_first():
    scores = torch.ones(6, dtype=torch.float64)
    layers = torch.tensor([0, 0, 0, 1, 1, 1])
    pruned = select_units(scores, layers, torch.zeros(6, dtype=torch.bool), 0.5, per_layer=False)
    assert pruned.tolist() == [True, True, True, False, False, False]
    pruned = select_units(scores, layers, torch.zeros(6, dtype=torch.bool), 0.5, per_layer=False, min_keep=1)
    assert pruned.tolist() == [True, True, False, True, False, False]


def test_pruned_units_stay_pruned_even_with_high_scores():
    scores = torch.tensor([9.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    before = torch.tensor([True, False, False, False])
    after = select_units(scores, torch.zeros(4, dtype=torch.long), before, 0.5, per_layer=False)
    assert after.tolist() == [True, True, False, False]


def test_per_layer_prunes_the_same_fraction_in_each_layer():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    layers = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    none = torch.zeros(8, dtype=torch.bool)
    assert select_units(scores, layers, none, 0.5, per_layer=True).tolist() == [True, True, False, False] * 2
    assert select_units(scores, layers, none, 0.5, per_layer=False).tolist() == [True] * 4 + [False] * 4


def test_standardized_scores_let_layers_of_different_scale_compete():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    scores = torch.cat([base, 1000 * base + 5])  # the same ranking in layer 1, at another scale
    layers = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    none = torch.zeros(8, dtype=torch.bool)
    z = standardize(scores, layers, none)
    assert z[:4].allclose(z[4:]) and z[:4].mean().abs() < 1e-12 and float(z[:4].std()) == pytest.approx(1.0)
    # raw global selection empties layer 0; standardised, each layer loses its two lowest (ties: lower index)
    assert select_units(scores, layers, none, 0.5, per_layer=False).tolist() == [True] * 4 + [False] * 4
    assert select_units(z, layers, none, 0.5, per_layer=False).tolist() == [True, True, False, False] * 2


def test_standardize_ignores_pruned_units_and_constant_layers():
    scores = torch.tensor([0.0, 10.0, 20.0, 7.0, 7.0], dtype=torch.float64)
    layers = torch.tensor([0, 0, 0, 1, 1])
    pruned = torch.tensor([True, False, False, False, False])
    z = standardize(scores, layers, pruned)
    assert z[0] == 0.0  # raw: pruned units stay as they were
    assert z[1:3].tolist() == pytest.approx([-2 ** -0.5, 2 ** -0.5])  # mean 15, sample std 7.07
    assert z[3:].tolist() == [0.0, 0.0]  # std 0: centered only


@pytest.mark.parametrize("signed", [False, True])  # movement scores are mostly negative
def test_radix_select_equals_sorting(signed):
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(1000, generator=g) if signed else torch.rand(1000, generator=g) for _ in range(3)]
    scores[1][:50] = scores[0][0]  # ties
    pruned = torch.zeros(1000, dtype=torch.bool)
    pruned[::7] = True
    keys = [score_keys(s, pruned) for s in scores]
    flat = torch.cat(keys).sort().values
    by_score = torch.cat([s[~pruned] for s in scores]).sort().values
    for k in (1, 17, 1500, 2500):
        thr, ties = kth_keys(keys, [0, 0, 0], torch.tensor([k]), Communicator())
        assert int(thr[0]) == int(flat[k - 1])
        assert int(ties[0]) == k - int((flat < flat[k - 1]).sum())
        n_pruned = 3 * int(pruned.sum())
        if k > n_pruned:  # the k-th smallest is a score: the same as sorting the scores
            assert float(key_to_score(thr)[0]) == float(by_score[k - n_pruned - 1])


def test_cubic_and_linear_schedules():
    cfg = parse_config({"bitter7": {"target_sparsity": 0.8, "schedule": {"start_step": 10, "end_step": 40,
                                                                         "frequency": 10}}})
    assert [sparsity_at(cfg, s) for s in (9, 10, 15, 20, 40, 41)] == pytest.approx(
        [None, 0.0, None, 0.8 / 27, 0.8, None], nan_ok=True)
    cfg = parse_config({"bitter7": {"target_sparsity": 0.8, "schedule": {"start_step": 0, "end_step": 25,
                                                                         "frequency": 10, "shape": "linear"}}})
    assert sparsity_at(cfg, 20) == pytest.approx(0.64)
    assert sparsity_at(cfg, 25) == pytest.approx(0.8)  # the end step is always an event
    # the last event's fraction by a step (launch/train.py warns with it when a run ends early)
    assert [sparsity_reached(cfg, s) for s in (0, 1, 19, 20, 24, 100)] == pytest.approx(
        [0.0, 0.0, 0.32, 0.64, 0.64, 0.8])


def test_default_schedule_prunes_after_the_first_step():
    """start_step = end_step = 0 (the defaults): the event runs after step 1, when Adam's state exists."""
    cfg = parse_config({"bitter7": {"target_sparsity": 0.5}})
    assert [sparsity_at(cfg, s) for s in (0, 1, 2)] == [None, 0.5, None]
    cfg = parse_config({"bitter7": {"target_sparsity": 0.5, "schedule": {"end_step": 10, "frequency": 5}}})
    assert [s for s in range(12) if sparsity_at(cfg, s) is not None] == [1, 5, 10]
