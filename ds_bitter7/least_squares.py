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
Below ``ridge = 1e-6`` the system is solved by pseudo-inverse (eigenvalues under the rounding of
``E[x x^T] - mu mu^T``, about ``eps * E[x^2]`` in float64, dropped): with fewer calibration rows than kept features, or collinear ones, ``S_KK`` is singular
but for rounding, and a plain solve returns a huge ``D`` that fits the calibration rows exactly and
nothing else.
With ``R`` empty ``D = 0``; with ``K`` empty it is mean compensation.

Under ZeRO each rank owns a flat fragment of ``W``'s fp32 master. The solve needs only
``S_KR W_R`` and ``mu_R W_R``, both linear in ``W_R``, so each group takes the smaller of two
all-reduces (one for all groups of the event): the removed rows ``W_R`` (``|R| x out``), summed
from every rank's owned part, or, when ``|K| + 1 < |R|`` (deep one-shot pruning), each rank's
products ``S_KR W_R^(r)`` and ``mu_R W_R^(r)`` with its owned elements ``W_R^(r)``
(``(|K| + 1) x out``). Every rank then solves the same float64 system, adds its own elements of
``D`` to its fp32 master fragment (and, ZeRO 1/2, the whole ``D`` to the model's replicated
parameter) and ``b' - b`` to the bias. With ``unstructured`` among the structures, the masks
then zero ``D`` on the elements of ``W`` that unstructured pruning dropped; each rank sums
``mu`` times those of its own elements, and one more all-reduce (``out`` numbers per group) gives
that part to the bias, so the layer's mean output is still kept. The covariance itself was all-reduced by
``ActivationStats`` (``F^2`` numbers per group: README Guarantee 5's documented exception).
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch

from .calibration import chunks
from .compensation import add_to_param, finite_stats, partly_compensated, warn_skipped
from .config import StructureName
from .structures import UnitGroup

RIDGE_SOLVE = 1e-6  # below this relative damping, a pseudo-inverse (a plain solve may blow up)


def solve_update(cov: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor, removed: torch.Tensor,
                 w_removed: torch.Tensor, ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(D ``[|K|, out]``, bias delta ``[out]``) for one layer, in float64.

    ``cov``: centered covariance ``[F, F]``; ``mean``: ``[F]``; ``keep``/``removed``: feature
    indices (LongTensor); ``w_removed``: the rows of ``W`` (``[F, out]`` layout) of ``removed``.
    """
    cov, mean, w_r = cov.to(torch.float64), mean.to(torch.float64), w_removed.to(torch.float64)
    return solve_products(cov[keep][:, keep], mean[keep], cov[keep][:, removed] @ w_r, mean[removed] @ w_r, ridge)


def solve_products(s_kk: torch.Tensor, mean_k: torch.Tensor, rhs: torch.Tensor, bias: torch.Tensor,
                   ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``solve_update`` from the blocks it needs: ``s_kk = S_KK``, ``mean_k = mu_K``, ``rhs = S_KR W_R``
    ``[|K|, out]`` and ``bias = mu_R W_R`` ``[out]`` (the removed features' mean contribution);
    float64, on the device of ``s_kk``."""
    s_kk = s_kk.to(torch.float64)
    mean_k, rhs, bias = (t.to(device=s_kk.device, dtype=torch.float64) for t in (mean_k, rhs, bias))
    if mean_k.numel() == 0 or not bool(rhs.any()):  # nothing to refit (no kept or no removed feature)
        return rhs.new_zeros(mean_k.numel(), bias.numel()), bias
    lam = ridge * float(s_kk.diagonal().mean().clamp(min=0.0))
    a = s_kk + lam * torch.eye(mean_k.numel(), dtype=torch.float64, device=s_kk.device)
    delta, info = torch.linalg.solve_ex(a, rhs) if ridge >= RIDGE_SOLVE else (None, 1)
    if int(info) != 0 or not bool(torch.isfinite(delta).all()):  # (near) singular: ridge ~0, dead features
        # S_KK = E[x x^T] - mu mu^T carries a cancellation error of about eps * E[x^2]: eigenvalues
        # below that are rounding, not signal, and inverting them is no minimum-norm fit
        eps, k = torch.finfo(torch.float64).eps, mean_k.numel()
        atol = 8 * k * eps * float((s_kk.diagonal() + mean_k.square()).max())
        delta = torch.linalg.pinv(a, atol=atol, rtol=k * eps, hermitian=True) @ rhs
    return delta, bias - mean_k @ delta


def _centered(stats, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``S[rows][:, cols]`` of the centered covariance ``E[x x^T] - mu mu^T``, formed for that
    block only (never the whole ``F x F``), on the device of the second moment."""
    device = stats.second_moment.device
    rows, cols, mean = rows.to(device), cols.to(device), stats.mean.to(device)
    return stats.second_moment[rows][:, cols] - torch.outer(mean[rows], mean[cols])


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


def _weight_update(group: UnitGroup, shape, keep: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` (``[|K|, out]``) placed on W's kept rows: float64, W's own shape and layout."""
    full = torch.zeros(tuple(shape), dtype=torch.float64)
    if group.out_in_dim == 0:
        full.index_copy_(0, keep, delta)
    else:
        full.index_copy_(1, keep, delta.T.contiguous())
    return full


def compensate_least_squares(pruner, masks_before: Dict[str, torch.Tensor], stats, event: dict) -> None:
    """Refit every group's out projection on its kept features (module docstring).

    Must run before the masks zero the weights. The groups are refit from the last block back to
    the first, with ``layers_per_pass`` a chunk at a time, each chunk's matrices from its own
    calibration pass (``stats`` then holds the vectors only), and each chunk's updates (``D``,
    ``|K| x out`` float64 per group, on the CPU) are applied before the next chunk's pass: a
    group's features are computed before any out projection of a later group runs (a block's
    attention before its MLP), so every pass sees them as the first did, the result is that of one
    pass, and only one chunk's ``D`` is held at a time (a failure once a chunk's refit is being
    written raises ``PartlyCompensated``, naming the groups refit). Collective: every rank must call this, in
    the same order (one all-reduce of the removed rows of every W_next per chunk, skipped at stage
    0, and with ``unstructured`` one more of ``out`` numbers per group).
    """
    t0 = time.perf_counter()
    ridge = float(pruner.config.bias_compensation.ridge)
    todo: List[Tuple[UnitGroup, torch.Tensor, torch.Tensor]] = []
    for g in sorted(pruner.groups, key=forward_position, reverse=True):
        keep, removed = _features(g, masks_before[g.key], pruner.masks[g.key])
        if removed.numel():
            todo.append((g, keep, removed))
    chunked = bool(pruner.stats.layers_per_pass)
    record = {"groups_by_products": 0, "covariance_bytes": 0, "gathered_bytes": 0, "update_bytes": 0}
    skipped, refit = [], []
    for chunk in chunks(todo, pruner.stats.layers_per_pass):
        try:
            chunk_stats = pruner.stats.gather(matrices=[g.key for g, _, _ in chunk]) if chunked else stats
            skipped += [g.key for g, _, _ in chunk if not finite_stats(chunk_stats[g.key])]  # same on every rank
            updates = _refit(pruner, [c for c in chunk if c[0].key not in skipped], chunk_stats, ridge, record)
        except Exception as err:
            if not refit:
                raise
            raise partly_refit(pruner, err, refit, todo) from err
        del chunk_stats  # this chunk's matrices
        record["update_bytes"] = max(record["update_bytes"], sum(d.numel() * 8 for _, _, d, _ in updates))
        try:
            _apply(pruner, updates, stats)
        except Exception as err:
            raise partly_refit(pruner, err, refit + [g.key for g, _, _, _ in updates], todo) from err
        refit += [g.key for g, _, _, _ in updates]
        del updates  # this chunk's D: gone before the next chunk's pass
    units = sum(int((masks_before[g.key] & ~pruner.masks[g.key]).sum()) for g, _, _ in todo if g.key not in skipped)
    skipped = [g.key for g in pruner.groups if g.key in skipped]  # in the model's order
    event["compensation"] = {"mode": "least_squares", "units": units, "groups": len(todo) - len(skipped), **record,
                             "ridge": ridge, "skipped": skipped, "seconds": time.perf_counter() - t0}
    warn_skipped(skipped, pruner.step_count)


def partly_refit(pruner, err: Exception, changed: List[str], todo) -> Exception:
    """``PartlyCompensated`` naming the groups whose refit may be written and those not."""
    rest = {g.key for g, _, _ in todo} - set(changed)
    return partly_compensated("least-squares compensation", err, changed,
                              [g.key for g in pruner.groups if g.key in rest])


def forward_position(group: UnitGroup) -> Tuple[int, int]:
    """Where a group's out projection runs in the forward: by block, a block's attention first."""
    return group.layer, 0 if group.kind == StructureName.attention_head else 1


def _apply(pruner, updates: List[Tuple[UnitGroup, torch.Tensor, torch.Tensor, torch.Tensor]], stats) -> None:
    """Add each refit (``D`` placed on W's kept rows, one layer's full update at a time) to W_next
    and its bias; with ``unstructured``, the bias also gets back the part of ``D`` the masks will
    take (``_dropped_part``, summed over the ranks: the same structures on every rank)."""
    def update(g: UnitGroup, keep: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return _weight_update(g, pruner.model.get_parameter(g.out_weight).shape, keep, delta)

    backs = [0.0] * len(updates)
    if pruner.unstructured is not None and updates:
        backs = _sum_over_ranks(pruner, [_dropped_part(pruner, g, update(g, keep, delta), stats[g.key].mean)
                                         for g, keep, delta, _ in updates])
    def add_all():
        for (g, keep, delta, bias_delta), back in zip(updates, backs):
            add_to_param(pruner, g.out_weight, update(g, keep, delta))
            add_to_param(pruner, g.out_bias, bias_delta + back)

    pruner.comm.call("applying the least-squares refit", add_all)  # local writes: a failure fails every rank


def _dropped_part(pruner, g: UnitGroup, update: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``mu @ U`` over the elements of ``W`` that unstructured pruning dropped and this rank owns
    (``[out]``, float64): the part of the refit ``U`` the masks take back after it, which the bias
    then gives back, so the layer's mean output is kept (the refit assumed all of ``U`` stays)."""
    in_dim = g.out_in_dim
    out = torch.zeros(update.shape[1 - in_dim], dtype=torch.float64)
    frag = pruner.access.fragments.get(g.out_weight)
    dropped = pruner.unstructured.pruned.get(g.out_weight) if frag is not None else None
    if dropped is None or not bool(dropped.any()):
        return out
    where = torch.zeros(update.numel(), dtype=torch.float64)
    where[frag.start:frag.start + frag.numel] = dropped.to(device="cpu", dtype=torch.float64)
    mean = mean.to(device="cpu", dtype=torch.float64)
    per_row = mean.view(-1, 1) if in_dim == 0 else mean.view(1, -1)  # mu_f along W's input dim
    return (per_row * update * where.view(update.shape)).sum(dim=in_dim)


def _sum_over_ranks(pruner, parts: List[torch.Tensor]) -> List[torch.Tensor]:
    """``parts`` summed over the ranks that share the ZeRO partition (one all-reduce)."""
    summed = pruner.score_comm.all_reduce_sum(torch.cat(parts))
    return list(torch.split(summed, [p.numel() for p in parts]))


def _refit(pruner, todo: List[Tuple[UnitGroup, torch.Tensor, torch.Tensor]], stats, ridge: float,
           record: dict) -> List[Tuple[UnitGroup, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(group, kept features, D, bias delta) of each of ``todo`` (D and the bias delta on the
    CPU), from one all-reduce; ``record``'s counts grow by these groups'. Collective: a failure
    of one rank's own work (an out-of-memory solve, say) fails every rank, none waits."""
    comm = pruner.score_comm
    # per group the smaller message: W_R ([|R|, out]) or this rank's products ([|K| + 1, out]);
    # the products are formed where the second moment is (the GPU's, when statistics came from it)
    products = [keep.numel() + 1 < removed.numel() for _, keep, removed in todo]

    def own_parts() -> List[torch.Tensor]:
        parts = []
        for (g, keep, removed), by_products in zip(todo, products):
            w_own = _rows(_owned(pruner, g.out_weight), g.out_in_dim, removed)  # [|R|, out], 0 where not owned
            if by_products:
                st = stats[g.key]
                w_own = w_own.to(st.second_moment.device)
                w_own = torch.cat([_centered(st, keep, removed) @ w_own, (st.mean[removed].to(w_own) @ w_own)[None]])
            parts.append(w_own.reshape(-1).cpu())
        return parts

    def solve_all(parts: List[torch.Tensor], gathered: torch.Tensor) -> list:
        out, offset = [], 0
        for (g, keep, removed), part, by_products in zip(todo, parts, products):
            st = stats[g.key]
            rows = keep.numel() + 1 if by_products else removed.numel()
            summed = gathered[offset:offset + part.numel()].view(rows, -1).to(st.second_moment.device)
            offset += part.numel()
            if not by_products:  # summed is W_R: form the products here
                summed = torch.cat([_centered(st, keep, removed) @ summed, (st.mean[removed].to(summed) @ summed)[None]])
            delta, bias_delta = solve_products(_centered(st, keep, keep), st.mean[keep], summed[:-1], summed[-1], ridge)
            out.append((g, keep, delta.cpu(), bias_delta.cpu()))
        return out

    parts = comm.call("the least-squares products", own_parts)
    gathered = comm.all_reduce_sum(torch.cat(parts)) if parts else torch.zeros(0)
    out = comm.call("the least-squares solve", solve_all, parts, gathered)
    record["covariance_bytes"] += sum(stats[g.key].second_moment.numel() * 8 for g, _, _ in todo)
    record["groups_by_products"] += sum(products)
    record["gathered_bytes"] += int(gathered.numel()) * 8
    return out
