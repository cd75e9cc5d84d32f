"""Exact thresholds: which units to prune, with ties broken by a fixed rule.

Structured units: every rank holds the same all-reduced scores, so selection is a local,
deterministic sort. Unstructured weights: an exact distributed k-th value (radix select over the
bit patterns of float32 scores, a few 256-bin histograms all-reduced), never a gather.

Tie rule everywhere: among equal scores the unit (or element) that comes first is pruned first,
in the order of the unit index (layer order, then unit), or for elements of (parameter order,
flat index).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from .comm import Communicator


def n_to_prune(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to the float error in products such as 0.29 * 100 or
    0.29 * 1e8 (the error grows with n: the tolerance is relative)."""
    product = fraction * n
    return int(math.floor(product + abs(product) * 2 ** -50 + 1e-9))  # a few ulps, relative


def _order(scores: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices in pruning order: already pruned first, then ascending score, ties by index."""
    key = scores.clone()
    key[pruned] = -math.inf
    return torch.sort(key, stable=True).indices


def select_units(scores: torch.Tensor, layers: torch.Tensor, pruned: torch.Tensor, fraction: float,
                 per_layer: bool, min_keep: int = 0) -> torch.Tensor:
    """New pruned mask (BoolTensor[n]) holding ``floor(fraction * n)`` units (or per layer).

    ``scores``: float64[n], ``layers``: LongTensor[n] (layer of each unit), ``pruned``: units
    already pruned, which stay pruned. With global scope each layer keeps at least ``min_keep``
    of its best units.
    """
    out = pruned.clone()
    if per_layer:
        for layer in torch.unique(layers).tolist():
            idx = (layers == layer).nonzero().flatten()
            k = max(n_to_prune(fraction, idx.numel()), int(pruned[idx].sum()))
            out[idx[_order(scores[idx], pruned[idx])[:k]]] = True
        return out
    candidates = torch.ones_like(pruned)
    if min_keep > 0:
        for layer in torch.unique(layers).tolist():
            idx = (layers == layer).nonzero().flatten()
            # Protect the units this layer would prune last (the same order, read from the end).
            last = [i for i in idx[_order(scores[idx], pruned[idx])].tolist() if not pruned[i]]
            candidates[last[len(last) - min(min_keep, len(last)):]] = False
    idx = candidates.nonzero().flatten()
    k = max(n_to_prune(fraction, scores.numel()), int(pruned.sum()))
    out[idx[_order(scores[idx], pruned[idx])[:k]]] = True
    return out


def standardize(scores: torch.Tensor, layers: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Scores z-scored per layer over its unpruned units (FLAP's adaptive structure search).

    Every unpruned unit gets ``(s - mean) / std`` of its layer's unpruned scores (sample std; a
    layer whose unpruned scores are all equal, or that has one left, gets ``s - mean``). Pruned
    units keep their raw score: ``select_units`` keeps them pruned whatever it is. Local and
    deterministic, so every rank holding the same all-reduced scores gets the same result.
    """
    out = scores.to(torch.float64).clone()
    for layer in torch.unique(layers).tolist():
        idx = ((layers == layer) & ~pruned).nonzero().flatten()
        if idx.numel() == 0:
            continue
        s = out[idx]
        centered = s - s.mean()
        std = float(s.std()) if idx.numel() > 1 else 0.0
        out[idx] = centered / std if std > 0 else centered
    return out


def threshold_of(scores: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
    """The largest score among units pruned by this event (nan when none)."""
    new = after & ~before
    return float(scores[new].max()) if bool(new.any()) else math.nan


# -- unstructured: exact distributed k-th smallest ------------------------------------------------

PRUNED_KEY = -(2 ** 31)  # the smallest int32: below every score's key
_SIGN = 2 ** 31


def score_keys(scores: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of finite float32 scores, of either sign; ``PRUNED_KEY`` for
    elements already pruned.

    The float32 bits as an unsigned number ``u``: flipping every bit of a negative and the sign bit
    of a positive orders them like the floats (the radix-sort mapping); shifted by -2**31 into int32.
    Finite scores map above ``PRUNED_KEY`` (only NaNs with the sign bit could reach it: callers skip
    events with non-finite scores).
    """
    scores = scores.to(torch.float32) + 0.0  # -0.0 + 0.0 is +0.0: one key for zero, ties by index
    bits = scores.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    ordered = torch.where(bits >= _SIGN, 0xFFFFFFFF - bits, bits + _SIGN)  # unsigned, 0 .. 2**32 - 1
    keys = (ordered - _SIGN).to(torch.int32)
    keys[pruned] = PRUNED_KEY
    return keys


def key_to_score(keys: torch.Tensor) -> torch.Tensor:
    """float32 scores of int32 ``score_keys`` (the inverse mapping)."""
    ordered = keys.to(torch.int64) + _SIGN
    bits = torch.where(ordered >= _SIGN, ordered - _SIGN, 0xFFFFFFFF - ordered)
    return torch.where(bits >= _SIGN, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def kth_keys(keys: Sequence[torch.Tensor], groups: Sequence[int], k: torch.Tensor,
             comm: Communicator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k-th smallest key of each group over all ranks' key tensors (radix select).

    ``keys[j]`` belongs to group ``groups[j]``; ``k``: LongTensor[G], 1-based ranks (k >= 1).
    Returns (threshold key per group, how many elements equal to it are within the k smallest).
    Collective: every rank must call this, in the same order (4 all-reduces of [G, 256] int64).
    """
    n_groups = k.numel()
    prefix = torch.zeros(n_groups, dtype=torch.int64)  # over the unsigned keys (key + 2**31)
    remaining = k.clone()
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(n_groups, 256, dtype=torch.int64)
        for t, g in zip(keys, groups):
            t64 = t.to(torch.int64) + _SIGN
            if shift < 24:
                t64 = t64[(t64 >> (shift + 8)) == (int(prefix[g]) >> (shift + 8))]
            hist[g] += torch.bincount((t64 >> shift) & 255, minlength=256).cpu()
        hist = comm.all_reduce_sum(hist)
        cum = hist.cumsum(1)  # [G, 256]
        digit = (cum < remaining[:, None]).sum(1)  # first bin whose cumulative count reaches k
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp_min(0)[:, None])[:, 0], 0)
        remaining -= below
        prefix |= digit << shift
    return prefix - _SIGN, remaining


def tie_quotas(tie_counts: torch.Tensor, ties_to_prune: torch.Tensor, groups: List[int]) -> torch.Tensor:
    """How many tied elements each (item, rank) prunes, in (item, rank) order within a group.

    ``tie_counts``: LongTensor[n_items, world], all-reduced; ``groups[i]``: group of item i.
    """
    quota = torch.zeros_like(tie_counts)
    left = ties_to_prune.clone()
    for i, g in enumerate(groups):
        for r in range(tie_counts.shape[1]):
            take = min(int(left[g]), int(tie_counts[i, r]))
            quota[i, r] = take
            left[g] -= take
    return quota
