"""Least-squares compensation: refit the next layer on the kept units (``mode: least_squares``).

For one unit group, ``x`` are the input features of the out projection (``n`` rows, ``F``
features), ``y = x W + b`` its output (``W`` is ``[F, out]`` here; ``nn.Linear`` stores the
transpose). When the features ``R`` are removed and ``K`` kept, we pick ``W_K'`` and ``b'`` that
minimise ``||x_K W_K' + b' - (x W + b)||^2`` over the calibration rows. With ``mu`` the feature means
and ``S`` the *centered* covariance (``E[x x^T] - mu mu^T``):

    D   = W_K' - W_K = (S_KK + lam I)^-1 S_KR W_R                    # [|K|, out]
    b'  = b + mu_R W_R - mu_K D

(centering splits the constant part off: the covariance fit leaves the mean error
``mu_K W_K + mu_R W_R - mu_K W_K'``, which the bias absorbs). ``lam = ridge * mean(diag(S_KK))``.
With ``R`` empty ``D = 0``; with ``K`` empty it is mean compensation.

Under ZeRO each rank owns a flat fragment of ``W``'s fp32 master. ``W_R`` (``|R| x out``) is
assembled by summing every rank's owned part of it (one all-reduce for all groups of the event);
every rank then solves the same float64 system, adds its own elements of ``D`` to its fp32 master
fragment (and, ZeRO 1/2, the whole ``D`` to the model's replicated parameter) and ``b' - b`` to
the bias. The covariance itself was all-reduced by ``ActivationStats`` (``F^2`` numbers per group:
DESIGN invariant 5's documented exception).
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch

from .structures import UnitGroup


def solve_update(cov: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor, removed: torch.Tensor,
                 w_removed: torch.Tensor, ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(D ``[|K|, out]``, bias delta ``[out]``) for one layer, in float64.

    ``cov``: centered covariance ``[F, F]``; ``mean``: ``[F]``; ``keep``/``removed``: feature
    indices (LongTensor); ``w_removed``: the rows of ``W`` (``[F, out]`` layout) of ``removed``.
    """
    cov, mean, w_r = cov.to(torch.float64), mean.to(torch.float64), w_removed.to(torch.float64)
    bias = mean[removed] @ w_r  # [out]: the removed features' mean contribution
    if keep.numel() == 0 or removed.numel() == 0:
        return w_r.new_zeros(keep.numel(), w_r.shape[1]), bias
    s_kk = cov[keep][:, keep]
    rhs = cov[keep][:, removed] @ w_r  # [|K|, out]
    lam = ridge * float(s_kk.diagonal().mean().clamp(min=0.0))
    a = s_kk + lam * torch.eye(keep.numel(), dtype=torch.float64)
    delta, info = torch.linalg.solve_ex(a, rhs)
    if int(info) != 0 or not bool(torch.isfinite(delta).all()):
        delta = torch.linalg.pinv(a, hermitian=True) @ rhs  # singular (ridge 0, dead features)
    return delta, bias - mean[keep] @ delta


def _features(group: UnitGroup, before: torch.Tensor, after: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, newly removed) input-feature indices of the out projection."""
    ids = group.feature_units
    has = ids >= 0
    unit = ids.clamp(min=0)
    kept = ~has | after[unit]
    removed = has & before[unit] & ~after[unit]
    return kept.nonzero().flatten(), removed.nonzero().flatten()


def _owned(pruner, name: str) -> torch.Tensor:
    """float64 tensor shaped like parameter ``name``: this rank's fp32 master elements, else 0."""
    param = pruner.model.get_parameter(name)
    full = torch.zeros(param.numel(), dtype=torch.float64)
    frag = pruner.access.fragments.get(name)
    if frag is not None:
        full[frag.start:frag.start + frag.numel] = pruner.access.master(frag).to(torch.float64).cpu()
    return full.view(tuple(param.shape))


def _rows(w: torch.Tensor, in_dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``W`` in ``[F, out]`` layout for features ``idx`` (Linear stores ``[out, F]``)."""
    return w.index_select(0, idx) if in_dim == 0 else w.index_select(1, idx).T


def _add_to_weight(pruner, group: UnitGroup, keep: torch.Tensor, delta: torch.Tensor) -> None:
    """Add ``delta`` (``[|K|, out]``) to W's kept rows: master fragment and model parameter."""
    name = group.out_weight
    param = pruner.model.get_parameter(name)
    full = torch.zeros(tuple(param.shape), dtype=torch.float64)
    if group.out_in_dim == 0:
        full.index_copy_(0, keep, delta)
    else:
        full.index_copy_(1, keep, delta.T.contiguous())
    frag = pruner.access.fragments.get(name)
    with torch.no_grad():
        if frag is not None:
            master = pruner.access.master(frag)
            part = full.view(-1)[frag.start:frag.start + frag.numel]
            master.copy_((master.to(torch.float64) + part.to(master.device)).to(master.dtype))
        if frag is None or not pruner.access.replicated:  # stage 0: the fragment is the param
            param.data.copy_((param.data.to(torch.float64) + full.to(param.device)).to(param.dtype))


def compensate_least_squares(pruner, masks_before: Dict[str, torch.Tensor], stats, event: dict) -> None:
    """Refit every group's out projection on its kept features (module docstring).

    Must run before the masks zero the weights. Collective: every rank must call this, in the
    same order (one all-reduce of the removed rows of every W_next, skipped at stage 0).
    """
    from .compensation import _add_to_bias  # the bias update is shared with mean compensation

    t0 = time.perf_counter()
    ridge = float(pruner.config.bias_compensation.ridge)
    todo: List[Tuple[UnitGroup, torch.Tensor, torch.Tensor]] = []
    for g in pruner.groups:
        keep, removed = _features(g, masks_before[g.key], pruner.masks[g.key])
        if removed.numel():
            todo.append((g, keep, removed))
    parts = [_rows(_owned(pruner, g.out_weight), g.out_in_dim, removed).reshape(-1) for g, _, removed in todo]
    gathered = pruner.score_comm.all_reduce_sum(torch.cat(parts)) if parts else torch.zeros(0)
    offset, cov_bytes, units = 0, 0, 0
    for (g, keep, removed), part in zip(todo, parts):
        w_r = gathered[offset:offset + part.numel()].view(removed.numel(), -1)  # [|R|, out]
        offset += part.numel()
        st = stats[g.key]
        cov = st.second_moment - torch.outer(st.mean, st.mean)  # centered, [F, F]
        delta, bias_delta = solve_update(cov, st.mean, keep, removed, w_r, ridge)
        _add_to_weight(pruner, g, keep, delta)
        _add_to_bias(pruner, g.out_bias, bias_delta)
        cov_bytes += cov.numel() * 8
        units += int((masks_before[g.key] & ~pruner.masks[g.key]).sum())
    event["compensation"] = {"mode": "least_squares", "units": units, "groups": len(todo),
                             "covariance_bytes": cov_bytes, "gathered_bytes": int(gathered.numel()) * 8,
                             "ridge": ridge, "seconds": time.perf_counter() - t0}
