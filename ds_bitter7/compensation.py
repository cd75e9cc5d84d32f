"""Bias compensation: fold removed units' mean activation into the next layer's bias.

For the input features ``f`` of the units removed at an event (README: Bias compensation),
``b_next += W_next[:, f] @ mu_f``, so the out projection keeps its mean output on the data the
statistics came from. Under ZeRO each rank owns only a flat fragment of ``W_next``'s fp32 master:
it computes the partial product over its own elements, the partial vectors of every group are
packed and all-reduced once (out-features long, never a weight), and every rank adds the result
to its fp32 master fragment of the bias (where it owns one) and to the model's own bias.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List

import torch
from torch import nn

from .comm import log_main, mark_every_rank
from .config import CompensationMode, StructureName
from .structures import ParamSlice, UnitGroup, unit_groups

logger = logging.getLogger(__name__)


def add_missing_out_biases(model: nn.Module, config) -> List[str]:
    """Give every pruned group's out projection a bias, zero-initialised, where it has none.

    LLaMA-family ``mlp.down_proj`` and ``self_attn.o_proj`` have no bias, so there is nothing to
    fold a removed unit's mean into. Must run before DeepSpeed flattens the parameters (that is,
    before ``deepspeed.initialize``). A zero bias leaves the model's output unchanged. Returns
    the names of the biases added.
    """
    kinds = [k for k in config.structures if k != StructureName.unstructured]
    added = []
    for g in unit_groups(model, kinds):
        if g.out_bias is not None:
            continue
        module = model.get_submodule(g.out_module)
        weight = module.weight
        n_out = weight.shape[1 - g.out_in_dim]
        module.bias = nn.Parameter(torch.zeros(n_out, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
        added.append(f"{g.out_module}.bias")
    if added:
        logger.info("ds_bitter7: added %d zero biases for bias compensation (%s, ...)", len(added), added[0])
    return added


def check_compensation(groups: List[UnitGroup], config) -> None:
    """Raise ``ValueError`` (locally, on every rank) when compensation cannot run on ``groups``."""
    cfg = config.bias_compensation
    if not cfg.enabled:
        return
    missing = [g.out_module for g in groups if g.out_bias is None]
    if missing:
        raise ValueError(f"bias compensation needs a bias on {missing[0]} (and {len(missing) - 1} more): "
                         "use ds_bitter7.initialize, or call ds_bitter7.prepare_model(model, config) before "
                         "deepspeed.initialize or Trainer(...)")


def removed_feature_means(group: UnitGroup, newly_pruned: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """float64[n_in_features]: ``mu_f`` for the input features of newly pruned units, else 0."""
    ids = group.feature_units
    hit = (ids >= 0) & newly_pruned[ids.clamp(min=0)]
    return torch.where(hit, mean.to(torch.float64), torch.zeros((), dtype=torch.float64))


def local_delta(pruner, group: UnitGroup, coef: torch.Tensor) -> torch.Tensor:
    """float64[n_out]: ``W_next @ coef`` over the elements of W_next this rank's master holds."""
    weight = pruner.model.get_parameter(group.out_weight)
    shape = tuple(weight.shape)
    in_dim = group.out_in_dim
    delta = torch.zeros(shape[1 - in_dim], dtype=torch.float64)
    frag = pruner.access.fragments.get(group.out_weight)
    if frag is None:
        return delta
    master = pruner.access.master(frag)
    coef, delta = coef.to(master.device), delta.to(master.device)  # work where the fragment lives
    layout = ParamSlice(group.out_weight, shape, in_dim, group.feature_units)
    for start, numel in layout.chunks(frag.start, frag.numel):
        values = master[start - frag.start:start - frag.start + numel].to(torch.float64)
        r0, grid = layout.row_grid(values, start)  # [rows touched, cols]
        r1 = r0 + grid.shape[0]
        if in_dim == 0:  # Conv1D [in, out]: rows are input features
            delta += (grid * coef[r0:r1, None]).sum(0)
        else:  # Linear [out, in]: rows are outputs
            delta[r0:r1] += grid @ coef
    return delta.cpu()


def add_to_param(pruner, name: str, delta: torch.Tensor) -> None:
    """Add ``delta`` (float64, the parameter's shape) to the fp32 master fragment this rank owns
    and to the model's own, replicated parameter; both sums are formed in float64. Where the model
    is bf16/fp16, the part this rank owns is then the new master rounded, as DeepSpeed writes it
    (its all-gather spreads that part; ``Pruner.prune_to`` runs one after the event)."""
    param = pruner.model.get_parameter(name)
    frag = pruner.access.fragments.get(name)
    with torch.no_grad():
        if frag is not None:
            master = pruner.access.master(frag)
            part = delta.reshape(-1)[frag.start:frag.start + frag.numel].to(master.device)
            master.copy_((master.to(torch.float64) + part).to(master.dtype))
        if frag is None or not pruner.access.replicated:  # stage 0: the fragment is the param
            update = param.data.to(torch.float64) + delta.view(param.shape).to(param.device)
            param.data.copy_(update.to(param.dtype))
        if frag is not None and not pruner.access.replicated and param.dtype != master.dtype:
            param.data.view(-1)[frag.start:frag.start + frag.numel].copy_(master)


class PartlyCompensated(RuntimeError):
    """Compensation failed after it may have changed some layers' weights: reload the model."""


def partly_compensated(what: str, err: Exception, changed: List[str], rest: List[str]) -> PartlyCompensated:
    """The error of a compensation that failed once it had begun to write weights (on every rank
    when ``err`` was): it names the groups whose out projection or bias may be changed, and the others."""
    error = PartlyCompensated(
        f"{what} failed ({type(err).__name__}: {err}) after changing (some of) the out projections or biases of "
        f"{changed}" + (f"; those of {rest} are unchanged" if rest else "")
        + ": reload the model or checkpoint before using or pruning it")
    if getattr(err, "on_every_rank", False):
        mark_every_rank(error)
    return error


def finite_stats(stats) -> bool:
    """Whether one group's statistics are finite: a forward that overflowed (fp16) makes them
    inf/NaN, and a least-squares refit from them would write NaN into the whole next layer. The
    statistics are reduced, so every rank decides alike."""
    parts = [stats.mean, stats.var] + ([stats.second_moment] if stats.second_moment is not None else [])
    return all(bool(torch.isfinite(t).all()) for t in parts)


def warn_skipped(keys: List[str], step: int) -> None:
    if keys:
        log_main("bitter7 step %d: activation statistics of %s are not finite (an overflowed forward?): "
                 "their units are pruned without compensation", step, ", ".join(keys),
                 level=logging.WARNING, log=logger)


def compensate(pruner, masks_before: Dict[str, torch.Tensor], stats, event: dict) -> None:
    """Fold the mean of every unit pruned at this event into its group's out-projection bias.

    Must run before the masks zero the weights (it reads W_next's columns of those units).
    Collective: every rank must call this, in the same order (one all-reduce, skipped at stage 0
    where every rank holds all of W_next).
    """
    if CompensationMode(pruner.config.bias_compensation.mode) == CompensationMode.least_squares:
        from .least_squares import compensate_least_squares

        compensate_least_squares(pruner, masks_before, stats, event)  # refits W_next too
        return
    t0 = time.perf_counter()
    todo, coefs, n_units, skipped = [], [], 0, []
    for g in pruner.groups:
        newly = masks_before[g.key] & ~pruner.masks[g.key]  # identical on every rank
        if not bool(newly.any()):
            continue
        coef = removed_feature_means(g, newly, stats[g.key].mean)
        if not bool(torch.isfinite(coef).all()):  # reduced statistics: every rank decides alike
            skipped.append(g.key)
            continue
        todo.append(g)
        coefs.append(coef)
        n_units += int(newly.sum())
    if todo:
        partial = pruner.comm.call("mean compensation", lambda: torch.cat(  # a failure here fails every rank
            [local_delta(pruner, g, c) for g, c in zip(todo, coefs)]))
        total = pruner.score_comm.all_reduce_sum(partial)  # [sum of n_out], one reduce per event

        def add_all():
            offset = 0
            for g in todo:
                bias = pruner.model.get_parameter(g.out_bias)
                add_to_param(pruner, g.out_bias, total[offset:offset + bias.numel()])
                offset += bias.numel()

        try:  # local writes: one rank's failure (out of memory) fails every rank
            pruner.comm.call("adding the mean compensation", add_all)
        except Exception as err:
            raise partly_compensated("mean compensation", err, [g.key for g in todo], []) from err
    event["compensation"] = {"mode": "mean", "units": n_units, "groups": len(todo), "skipped": skipped,
                             "seconds": time.perf_counter() - t0}
    warn_skipped(skipped, pruner.step_count)
