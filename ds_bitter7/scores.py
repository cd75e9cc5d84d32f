"""Per-element importance scores: a registry of small pure functions.

Each scorer maps the local values of one fragment (fp32 master weights and the optimizer state it
names) to a per-element score, in float64. Unit scores are sums of these over a unit's elements.
A new criterion is one function and one entry in ``SCORERS``. A unit-level criterion computed from
activation statistics and the replicated weights (``fluctuation``) gives ``unit_fn`` instead; one
that ranks all groups of a structure type jointly (``obs``, ``bitter7_obs``: ``obs.py``) gives ``kind_fn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import ScoreName
from .obs import removal_order


@dataclass
class ScoreInputs:
    """Aligned flat views over one range of a parameter (all the same length)."""

    weight: torch.Tensor
    exp_avg_sq: Optional[torch.Tensor] = None
    movement: Optional[torch.Tensor] = None
    eps: float = 1e-8
    exponent: float = 0.25


@dataclass(frozen=True)
class Scorer:
    needs: Tuple[str, ...]  # ScoreInputs fields that must be present
    fn: Optional[Callable[[ScoreInputs], torch.Tensor]]  # None: a unit-level score (``unit_fn``)
    needs_stats: bool = False  # needs the units' activation statistics
    times_unit_std: bool = False  # ``fn``'s unit sums multiplied by each unit's activation std
    unit_fn: Optional[Callable] = None  # (group, model, UnitStats) -> float64[n_units], no element sums
    kind_fn: Optional[Callable] = None  # (groups, model, stats, masks, ridge, per_layer=, fraction=, min_keep=,
    #                                      output_weights=, comm=, free_stats=): collective, identical on every rank
    uses_covariance: bool = False  # needs each group's feature covariance (as least squares does)
    output_fisher: bool = False  # kind_fn weighs output errors by Adam's exp_avg_sq (``obs.output_fisher``)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def bitter7(x: ScoreInputs) -> torch.Tensor:
    """``|w| * (exp_avg_sq + eps) ** exponent``: Adam's second moment approximates the Fisher."""
    return _f64(x.weight).abs_() * (_f64(x.exp_avg_sq) + x.eps).pow_(x.exponent)


def magnitude(x: ScoreInputs) -> torch.Tensor:
    """``|w|``."""
    return _f64(x.weight).abs_()


def fisher(x: ScoreInputs) -> torch.Tensor:
    """``w**2 * exp_avg_sq``: the diagonal-Fisher saliency (optimal brain damage)."""
    return _f64(x.weight).square_() * _f64(x.exp_avg_sq)


def movement(x: ScoreInputs) -> torch.Tensor:
    """Accumulated ``-w * grad`` over optimizer steps (Sanh et al. 2020)."""
    return _f64(x.movement)


def fluctuation(group, model, stats) -> torch.Tensor:
    """FLAP's fluctuation (An et al. 2024): per unit, the sum over its input features f of the next
    layer of ``Var(x_f) * ||W_next[f, :]||^2``, the output variance its removal loses (what mean
    compensation cannot restore). Reads the replicated model weight: no per-element optimizer
    state, no reduction beyond the gathered statistics."""
    w = model.get_parameter(group.out_weight).detach().to(torch.float64)
    sq = w.square().sum(1 if group.out_in_dim == 0 else 0).cpu()  # [n_features]
    ids = group.feature_units
    valid = ids >= 0
    score = torch.zeros(group.n_units, dtype=torch.float64)
    score.index_add_(0, ids[valid], (stats.var.cpu() * sq)[valid])
    return score


SCORERS: Dict[ScoreName, Scorer] = {
    ScoreName.bitter7: Scorer(("exp_avg_sq",), bitter7),
    ScoreName.magnitude: Scorer((), magnitude),
    ScoreName.fisher: Scorer(("exp_avg_sq",), fisher),
    ScoreName.movement: Scorer(("movement",), movement),
    ScoreName.bitter7_variance: Scorer(("exp_avg_sq",), bitter7, needs_stats=True, times_unit_std=True),
    ScoreName.fluctuation: Scorer((), None, needs_stats=True, unit_fn=fluctuation),
    ScoreName.obs: Scorer((), None, needs_stats=True, kind_fn=removal_order, uses_covariance=True),
    ScoreName.bitter7_obs: Scorer(("exp_avg_sq",), None, needs_stats=True, kind_fn=removal_order,
                                  uses_covariance=True, output_fisher=True),
}


def get_scorer(name) -> Scorer:
    return SCORERS[ScoreName(name)]
