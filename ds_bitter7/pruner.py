"""The pruner: schedule, distributed scoring, masks and their upkeep inside the optimizer step.

Data flow of one event (every rank, in lockstep):
local fragments -> per-element scores -> per-unit partial sums (float64) -> one all-reduce per
structure type -> identical unit scores everywhere -> exact selection -> masks written to this
rank's fp32 master fragments and Adam moments (and, being replicated, to the model's own
parameters). Between events a step pre-hook (or post-hook) keeps pruned elements at exactly zero.

Scheduled events run in the base optimizer's step post-hook, except those that calibrate on the
model under ZeRO 1/2: the model's parameters are updated only after that hook, so these run as
``engine.step()`` returns (the engine's ``step`` is wrapped).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time
from typing import Dict, List, Optional, Set, Tuple

import torch

from .calibration import ActivationStats, needs_stats, unit_std
from .comm import LOCAL, Communicator, log_main, mark_every_rank
from .compensation import PartlyCompensated, compensate
from .config import Bitter7Config, MaskUpkeep, Scope, StatsSource, StructureName, enum_name
from .obs import greedy_groups, output_fisher
from .schedule import next_event_step, sparsity_at, sparsity_reached
from .scores import ScoreInputs, get_scorer
from .state import CheckpointError
from .structures import (
    CHUNK_ELEMENTS,
    ParamSlice,
    UnitGroup,
    apply_zero_plan,
    unit_groups,
    unstructured_params,
)
from .threshold import n_to_prune, select_units, standardize, threshold_of
from .unstructured import UnstructuredMasks
from .zero_access import MissingOptimizerState, ZeroAccess

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class Pruner:
    """Structured (and unstructured) pruning attached to one DeepSpeed engine."""

    def __init__(self, engine, config: Bitter7Config, calibration_data=None):
        self.engine = engine
        self.config = config
        self.model = engine.module
        self.comm = Communicator(getattr(engine.optimizer, "dp_process_group", None))
        self.kinds = [k for k in config.structures if k != StructureName.unstructured]
        self.groups: List[UnitGroup] = unit_groups(self.model, self.kinds)
        self.scorer = get_scorer(config.score)
        unstructured = unstructured_params(self.model) if StructureName.unstructured in config.structures else []
        pruned = {s.name for g in self.groups for s in g.slices} | set(unstructured)
        # same on every rank: no collective yet. DeepSpeed keeps no fp32 master or optimizer state for
        # these, so their part of a unit could be neither scored nor kept at zero
        _refuse(sorted(n for n in pruned if not self.model.get_parameter(n).requires_grad),
                "is frozen (requires_grad=False)", "unfreeze it")
        outputs = {g.out_bias for g in self.groups if g.out_bias} | {g.out_weight for g in self.groups}
        self.access = ZeroAccess(engine, pruned | outputs)
        _refuse(sorted(n for n in pruned if n not in self.access.in_optimizer), "is in no optimizer param group",
                "pass it to the optimizer (model_parameters)")  # model_parameters or a client optimizer left it out
        # Score chunks small enough that an event's temporaries (about 40 bytes per chunk
        # element) stay well under the size of the local fp32 partition (4 bytes per element).
        self._chunk = max(1 << 12, min(CHUNK_ELEMENTS, self.access.local_numel() // 16))
        # Stage 0 replicates the whole state: every rank scores everything, nothing is reduced.
        self.score_comm = Communicator(self.comm.group) if not self.access.replicated else LOCAL
        self.masks: Dict[str, torch.Tensor] = {g.key: torch.ones(g.n_units, dtype=torch.bool)
                                               for g in self.groups}
        # an export's all-zero stand-ins for layers pruned whole: pruned from the start, in no fraction
        self.placeholders: Set[str] = placeholder_groups(self.model, self.groups)
        for key in self.placeholders:
            self.masks[key][:] = False
        self.unstructured = (UnstructuredMasks(self, unstructured) if unstructured else None)
        self._plans: Dict[str, List[tuple]] = {}  # fragment name -> zeroing plan (structured)
        self._drop: Dict[str, torch.Tensor] = {}  # fragment name -> BoolTensor[numel] (unstructured)
        self.movement: Dict[str, torch.Tensor] = {}
        if "movement" in self.scorer.needs:
            self.movement = {n: torch.zeros(f.numel, dtype=torch.float32, device=f.flat.device)
                             for n, f in self.access.fragments.items()}
        # Activation statistics per unit group (bias compensation, variance-aware score).
        self.stats = ActivationStats(self, calibration_data) if needs_stats(config) else None
        self.step_count = 0
        self.last_event: Optional[dict] = None
        self.events: List[dict] = []
        self._broken: Optional[str] = None  # why no event may run: one failed after changing weights
        self._stepping = False  # True while an event runs inside the optimizer step
        self._pending: Optional[float] = None  # an event due at this step, run when engine.step returns
        self._hooks = self.access.register_step_hooks(self._pre_step, self._post_step)
        self._wrap_engine_step()
        if self.placeholders:  # kept at zero from the start (a config-only export trains from a random init)
            self._apply_masks_now()

    # -- public API --------------------------------------------------------------------------------
    def unit_scores(self) -> Dict[str, torch.Tensor]:
        """Global score of every unit, float64, identical on every rank.

        Collective: every rank must call this, in the same order.
        """
        with self._one_batch_list():
            stats = self._gather() if self.stats is not None and self.scorer.needs_stats else None
            out = {}
            for kind in self.kinds:
                out.update(self._kind_scores(kind, stats))
        return out

    def prune_to(self, fraction: float) -> dict:
        """One pruning event now: each structure type to ``fraction`` of its units removed.

        Units already pruned stay pruned. When it returns, every rank's fp32 masters, Adam moments
        and model parameters reflect it. Collective: every rank must call this, in the same order.
        Returns the event's record (also ``last_event``, appended to ``events``): ``step``,
        ``fraction``, per type ``sparsity`` and ``thresholds``, ``skipped`` types (NaN scores),
        ``stats_rows`` (token rows the activation statistics cover, all ranks; with statistics
        only), ``stats_passes`` (calibration passes this event ran; source ``calibration``),
        ``compensation`` (when enabled), ``seconds`` and ``bytes`` reduced.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (numbers.Real, torch.Tensor)) or (
                torch.is_tensor(fraction) and fraction.numel() != 1) or not 0.0 <= float(fraction) < 1.0:
            raise ValueError(f"prune_to: fraction must be a number in [0, 1), got {fraction!r}")
        fraction = float(fraction)  # a tensor or numpy number: the event record stays JSON
        with self._one_batch_list():
            event = self._event(fraction)
        half = next(self.model.parameters()).dtype != torch.float32
        if not self.access.replicated and not self._stepping and (
                self.unstructured is not None or (half and "compensation" in event)):
            # unstructured masks are per rank, and a compensated bf16/fp16 parameter is exact only on
            # the rank that owns its master: DeepSpeed's copy and all-gather of the masters (collective)
            self.access.update_lp_params()
        return event

    def sparsity_report(self) -> List[dict]:
        """Per layer key: units kept / total and parameter elements kept / total (an export's
        placeholder unit, ``placeholders``, counts among the parameters only)."""
        rows = []
        for g in self.groups:
            keep = self.masks[g.key]
            per_unit = g.params_per_unit()
            rows.append({"key": g.key, "kind": enum_name(g.kind), "units_kept": int(keep.sum()),
                         "units_total": 0 if g.key in self.placeholders else g.n_units,
                         "params_kept": int(per_unit[keep].sum()), "params_total": int(per_unit.sum())})
        if self.unstructured is not None:
            rows.extend(self.unstructured.report())
        return rows

    def pruned_units(self) -> Dict[str, Tuple[int, int]]:
        """Per structure type (its config name): (live units the masks prune, live units); an
        export's placeholder units are neither."""
        out: Dict[str, Tuple[int, int]] = {}
        for g in self.groups:
            if g.key not in self.placeholders:
                pruned, total = out.get(enum_name(g.kind), (0, 0))
                out[enum_name(g.kind)] = (pruned + int((~self.masks[g.key]).sum()), total + g.n_units)
        return out

    def format_report(self) -> str:
        """The sparsity report as a fixed-width table."""
        lines = [f"{'layer':<22}{'kind':<16}{'units kept':>14}{'params kept':>20}"]
        for r in self.sparsity_report():
            frac = f"sparsity {1 - r['units_kept'] / r['units_total']:.3f}" if r["units_total"] else "placeholder"
            lines.append(f"{r['key']:<22}{r['kind']:<16}{r['units_kept']:>7}/{r['units_total']:<6}"
                         f"{r['params_kept']:>11}/{r['params_total']:<8} {frac}")
        return "\n".join(lines)

    # -- scores ------------------------------------------------------------------------------------
    def _score_inputs(self, frag, start: int, numel: int) -> ScoreInputs:
        """Score inputs over elements [start, start+numel) of a fragment's parameter."""
        a, sub = self.access, slice(start - frag.start, start - frag.start + numel)
        x = ScoreInputs(a.master(frag)[sub], eps=self.config.eps, exponent=self.config.exponent)
        if "exp_avg_sq" in self.scorer.needs:
            x.exp_avg_sq = a.state(frag)[sub]
        if "movement" in self.scorer.needs:
            x.movement = self.movement[frag.name][sub]
        return x

    def _reduced_sums(self, parts: List[Tuple[int, List[ParamSlice]]], values) -> torch.Tensor:
        """float64[sum of the sizes], on the host: for each part ``(size, slices)``, ``values(frag,
        start, numel)`` (per element of a flat range of a fragment) summed per index of each slice's
        ``dim``, over the ranges this rank owns, then over all ranks (one all-reduce). A missing
        optimizer state on any rank fails every rank. Collective."""
        # Accumulate where the fragments live (one copy to the host at the end, no per-chunk sync).
        device = next((f.flat.device for f in self.access.fragments.values()), torch.device("cpu"))
        sums = torch.zeros(sum(n for n, _ in parts), dtype=torch.float64, device=device)
        error, offset = None, 0
        try:
            for n, slices in parts:
                out = sums[offset:offset + n]
                for s in slices:
                    frag = self.access.fragments.get(s.name)
                    if frag is None:  # a rank may own no part of it: it still takes part
                        continue
                    for start, numel in s.chunks(frag.start, frag.numel, self._chunk):
                        s.add_unit_sums(out, values(frag, start, numel), start)
                offset += n
        except Exception as e:  # noqa: BLE001 - a missing optimizer state, or this rank's own failure (out of
            error = e  # memory): raised on every rank below, none waits in the all-reduce
        self.comm.raise_if_any(error, "scoring")
        return self.score_comm.all_reduce_sum(sums.cpu())

    def _kind_scores(self, kind: StructureName, stats: Optional[dict] = None,
                     fraction: Optional[float] = None) -> Dict[str, torch.Tensor]:
        groups = [g for g in self.groups if g.kind == kind]
        if self.scorer.unit_fn is not None:  # from gathered statistics and replicated weights: same everywhere
            return {g.key: self.scorer.unit_fn(g, self.model, stats[g.key]) for g in groups}
        if self.scorer.kind_fn is not None:  # a greedy order: each rank runs its share of the groups
            chunked = self.stats is not None and bool(self.stats.layers_per_pass)
            if chunked:  # this rank's groups' matrices, a few layers per pass (freed by the greedy as it copies them)
                keys = [g.key for g in groups]
                mine = {keys[i] for i in greedy_groups(len(groups), self.comm)}
                stats = self.stats.with_matrices(stats, keys, mine.__contains__)
            weights = None
            if self.scorer.output_fisher:  # collective: every rank reads its share of exp_avg_sq
                weights = output_fisher(groups, self._output_column_sums(groups), stats)
            return self.scorer.kind_fn(
                groups, self.model, stats, self.masks, float(self.config.bias_compensation.ridge),
                per_layer=self.config.scope == Scope.per_layer, fraction=fraction,
                min_keep=self.config.min_units_per_layer if self.config.scope == Scope.global_ else 0,
                output_weights=weights, comm=self.comm, free_stats=chunked)
        sums = self._reduced_sums([(g.n_units, g.slices) for g in groups],
                                  lambda frag, start, numel: self.scorer.fn(self._score_inputs(frag, start, numel)))
        out = _by_group(sums, groups)  # [n_units of this kind, all layers]
        if self.scorer.times_unit_std:
            out = {g.key: out[g.key] * unit_std(g, stats[g.key]) for g in groups}
        return out

    def _fraction_of_all(self, kind: StructureName, fraction: float) -> float:
        """The fraction of all of ``kind``'s units that prunes ``fraction`` of its live ones, the
        placeholder units (pruned already) aside. ``per_layer`` needs none: a placeholder's layer
        has no other unit."""
        n = sum(g.n_units for g in self.groups if g.kind == kind)
        dead = sum(g.n_units for g in self.groups if g.kind == kind and g.key in self.placeholders)
        if not dead or self.config.scope == Scope.per_layer:
            return fraction
        return (dead + n_to_prune(fraction, n - dead)) / n

    def _output_column_sums(self, groups: List[UnitGroup]) -> Dict[str, torch.Tensor]:
        """Per group key, float64[out]: Adam's ``exp_avg_sq`` of the next layer's weight summed over
        its input features, for each output feature; each rank sums the range it owns, one
        all-reduce adds them up (``out`` numbers per group). Collective."""
        slices = []
        for g in groups:
            shape = tuple(self.model.get_parameter(g.out_weight).shape)
            out_dim = 1 if g.out_in_dim == 0 else 0
            slices.append(ParamSlice(g.out_weight, shape, out_dim, torch.arange(shape[out_dim])))
        sizes = [s.shape[s.dim] for s in slices]
        sums = self._reduced_sums([(n, [s]) for n, s in zip(sizes, slices)], lambda frag, start, numel: (
            self.access.state(frag)[start - frag.start:start - frag.start + numel].to(torch.float64)))
        return dict(zip([g.key for g in groups], torch.split(sums, sizes)))

    # -- events ------------------------------------------------------------------------------------
    def _event(self, fraction: float) -> dict:
        self.refuse_if_broken("prune")
        t0 = time.perf_counter()
        bytes0 = self.comm.bytes_sent + self.score_comm.bytes_sent
        event = {"step": self.step_count, "fraction": fraction, "sparsity": {}, "thresholds": {},
                 "skipped": []}
        passes = self.stats.passes if self.stats is not None else 0
        stats = self._gather(release=True) if self.stats is not None else None  # collective
        if stats:
            event["stats_rows"] = min(s.count for s in stats.values())  # token rows, all ranks
        masks_before = {k: v.clone() for k, v in self.masks.items()}
        unstructured_before = self.unstructured.snapshot() if self.unstructured is not None else None
        try:
            self._select_and_compensate(fraction, stats, masks_before, event)
        except Exception as err:
            # nothing is zeroed yet: with the masks as they were, the pruner is as before the event (a
            # retry compensates the units again); a refit that changed weights makes it unusable
            self.masks.update(masks_before)
            if unstructured_before is not None:
                self.unstructured.rollback(unstructured_before)
            if isinstance(err, PartlyCompensated):
                self._broken = str(err)
            raise
        self._apply_masks_now()
        if self.stats is not None and self.stats.source == StatsSource.calibration:
            event["stats_passes"] = self.stats.passes - passes
        event["seconds"] = time.perf_counter() - t0
        event["bytes"] = self.comm.bytes_sent + self.score_comm.bytes_sent - bytes0
        self.last_event = event
        self.events.append(event)
        log_main("bitter7 step %d: sparsity %s thresholds %s (%.3f s, %d bytes reduced)", event["step"],
                 {k: round(v, 4) for k, v in event["sparsity"].items()},
                 {k: ("none: no unit pruned" if isinstance(v, float) and math.isnan(v) else v)
                  for k, v in event["thresholds"].items()},
                 event["seconds"], event["bytes"], log=logger)
        return event

    def refuse_if_broken(self, what: str) -> None:
        """Raise (on every rank alike, as the failure was) when an earlier event failed after its
        compensation changed weights: the model must be reloaded before it is pruned or saved."""
        if self._broken:
            error = RuntimeError(f"ds_bitter7: cannot {what}: an earlier pruning event failed after changing weights "
                                 f"({self._broken})")
            mark_every_rank(error)
            raise error

    def _select_and_compensate(self, fraction: float, stats, masks_before: Dict[str, torch.Tensor],
                               event: dict) -> None:
        """The event's new masks (structured and unstructured) and its compensation (which reads
        W_next before the masks zero it). Collective."""
        for kind in self.kinds:
            of_all = self._fraction_of_all(kind, fraction)  # placeholder units stand outside the fraction
            scores = self._kind_scores(kind, stats, of_all)  # obs orders only the prefix it needs
            keys = list(scores)
            flat = torch.cat([scores[k] for k in keys])
            if not bool(torch.isfinite(flat).all()):
                event["skipped"].append(enum_name(kind))
                log_main("bitter7 step %d: %s scores contain NaN/Inf; this event prunes nothing",
                         self.step_count, enum_name(kind), level=logging.WARNING, log=logger)
                continue
            layers = torch.cat([torch.full((scores[k].numel(),), i) for i, k in enumerate(keys)])
            before = ~torch.cat([self.masks[k] for k in keys])
            if self.config.scope == Scope.standardized:
                flat = standardize(flat, layers, before)  # thresholds are then in z units
            after = select_units(flat, layers, before, of_all, self.config.scope == Scope.per_layer,
                                 self.config.min_units_per_layer)
            event["thresholds"][enum_name(kind)] = threshold_of(flat, before, after)
            offset = 0
            for k in keys:
                n = scores[k].numel()
                self.masks[k] = ~after[offset:offset + n]
                offset += n
            pruned, live = self.pruned_units().get(enum_name(kind), (0, 0))
            event["sparsity"][enum_name(kind)] = reached = pruned / max(1, live)
            if (self.config.scope != Scope.per_layer and self.config.min_units_per_layer
                    and int(after.sum()) < n_to_prune(of_all, after.numel())):  # the floor held units back
                log_main("bitter7 step %d: %s: min_units_per_layer %d keeps %d units of %d; %.4f pruned, "
                         "not the %.4f asked", self.step_count, enum_name(kind), self.config.min_units_per_layer,
                         live - pruned, live, reached, fraction, level=logging.WARNING, log=logger)
        if self.unstructured is not None:
            self.unstructured.event(fraction, event)
        if self.config.bias_compensation.enabled and stats is not None:
            compensate(self, masks_before, stats, event)  # before zeroing: it reads W_next

    def _one_batch_list(self):
        """Every calibration pass inside reads the same batches (several per event with
        ``layers_per_pass``)."""
        return self.stats.same_batches() if self.stats is not None else contextlib.nullcontext()

    def _gather(self, release: bool = False) -> dict:
        """The activation statistics an event starts from (collective): with ``layers_per_pass``,
        the vectors only; the matrices come later, a few layers per pass, where they are used."""
        return self.stats.gather(release=release, matrices=() if self.stats.layers_per_pass else None)

    def _apply_masks_now(self) -> None:
        """Rebuild the per-fragment zeroing plans and apply them to masters, moments and the model."""
        self._plans, self._drop = {}, {}
        for g in self.groups:
            keep = self.masks[g.key]
            if bool(keep.all()):
                continue
            for s in g.slices:
                with torch.no_grad():
                    param = self.model.get_parameter(s.name)
                    param.data.index_fill_(s.dim, s.pruned_coords(keep).to(param.device), 0)
                frag = self.access.fragments.get(s.name)
                if frag is not None:
                    self._plans[s.name] = s.zero_plan(keep, frag.start, frag.numel, frag.flat.device)
        if self.unstructured is not None:
            self._drop = self.unstructured.drop_masks()  # per-element: boolean masks
        self._apply_drop(range(self.access.n_groups))

    def _apply_drop(self, groups, gradients_only: bool = False) -> None:
        """Zero pruned elements of the fragments in ``groups``: masters, moments and movement
        accumulators, or with ``gradients_only`` just the fp32 gradients (inside every step)."""
        groups = set(groups)
        with torch.no_grad():
            for name in self._plans.keys() | self._drop.keys():  # only fragments with pruned elements
                frag = self.access.fragments[name]
                if frag.group not in groups:
                    continue
                plan, drop = self._plans.get(name), self._drop.get(name)
                if gradients_only:
                    grad = self.access.grad(frag)
                    tensors = [] if grad is None else [grad]
                else:
                    tensors = [self.access.master(frag)] + self.access.moment_views(frag)
                    if name in self.movement:
                        tensors.append(self.movement[name])
                    if drop is not None and not self.access.replicated:
                        # The model's copy of this rank's range: groups that stepped before the
                        # event were already copied from their masters; DeepSpeed all-gathers
                        # every group's range after the step (prune_to all-gathers itself).
                        tensors.append(frag.param.data.view(-1).narrow(0, frag.start, frag.numel))
                for t in tensors:
                    if plan:
                        apply_zero_plan(t, plan)
                    if drop is not None:
                        t.masked_fill_(drop, 0)

    # -- optimizer hooks ---------------------------------------------------------------------------
    def _pre_step(self, groups: List[int]) -> None:
        if self.config.mask_upkeep == MaskUpkeep.gradient:
            # A pruned element with zero weight, zero moments and zero gradient stays exactly zero
            # under Adam/AdamW: zeroing one tensor here keeps all three at zero.
            self._apply_drop(groups, gradients_only=True)
        if not self.movement:
            return
        with torch.no_grad():
            for name, acc in self.movement.items():
                frag = self.access.fragments[name]
                grad = self.access.grad(frag) if frag.group in groups else None
                if grad is not None:
                    acc.sub_(self.access.master(frag) * grad)  # movement score: -w * dL/dw

    def _post_step(self, groups: List[int]) -> None:
        if self.config.mask_upkeep == MaskUpkeep.state:
            self._apply_drop(groups)
        if self.access.n_groups - 1 not in groups:
            return  # ZeRO steps groups one by one: act once, after the last
        self.step_count += 1
        if self.step_count == 1 and self.config.enabled:
            self._check_optimizer_state()
        fraction = sparsity_at(self.config, self.step_count)
        if fraction is None or not self.config.enabled:
            return
        if self._event_reads_model():
            self._pending = fraction  # the model's parameters are half updated until engine.step returns
            return
        self._stepping = True
        try:
            with self._one_batch_list():
                self._event(fraction)
        finally:
            self._stepping = False

    def _check_optimizer_state(self) -> None:
        """After the first step, not at the first event thousands of steps later: a score that
        reads ``exp_avg_sq`` needs an optimizer that keeps it (Adam-type). Same on every rank."""
        if "exp_avg_sq" not in self.scorer.needs:
            return
        error = None
        try:  # every fragment: an optimizer may keep it for some groups only (Muon with an Adam part)
            for frag in self.access.fragments.values():  # a rank may own none: it still takes part
                self.access.state(frag)
        except MissingOptimizerState as err:  # names the optimizer
            error = err
        self.comm.raise_if_any(error, "the optimizer state check", kind=MissingOptimizerState)

    def _event_reads_model(self) -> bool:
        """Whether an event reads the model's parameters (calibration forwards, or a score from
        the replicated weights: ``fluctuation``, ``obs``) while, inside the step, they are half
        updated: ZeRO 1/2 and BF16_Optimizer copy each group's fp32 masters into the rank's own
        slice as that group steps and all-gather the rest after the last one, so mid-step the
        ranks' copies differ (and their masks would)."""
        reads_model = self.scorer.unit_fn is not None or self.scorer.kind_fn is not None
        return (self.stats is not None and not self.access.replicated
                and (self.stats.source == StatsSource.calibration or reads_model))

    def _wrap_engine_step(self) -> None:
        """Run an event deferred by ``_post_step`` as soon as ``engine.step()`` has updated the
        model: then it calibrates on the weights it scores, exactly as ``prune_to`` would."""
        step = self.engine.step

        def engine_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if self._pending is not None:
                fraction, self._pending = self._pending, None
                self.prune_to(fraction)
            return out

        self.engine.step = engine_step

    # -- checkpoint state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Replicated pruner state (identical on every rank, independent of world size)."""
        return {"version": STATE_VERSION, "model_type": self.model.config.model_type,
                "structures": [enum_name(s) for s in self.config.structures], "score": enum_name(self.config.score),
                "unit_counts": {g.key: g.n_units for g in self.groups},
                "masks": {k: v.clone() for k, v in self.masks.items()}, "step": self.step_count,
                "events": list(self.events), "world_size": self.comm.world_size}

    def load_state_dict(self, state: dict, source: str = "the given state") -> None:
        """Restore masks and schedule position; the error names ``source`` and every mismatch.
        This rank's unstructured masks come with :meth:`load_local_state_dict`, which must follow."""
        problems = []
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"bitter7 pruner state in {source} has version {version!r}, "
                                  f"expected {STATE_VERSION}")
        expect = {"model_type": self.model.config.model_type,
                  "structures": [enum_name(s) for s in self.config.structures],
                  "unit_counts": {g.key: g.n_units for g in self.groups}}
        for key, want in expect.items():
            have = state.get(key)
            if key == "structures" and isinstance(have, list):  # each type is pruned on its own: order is no matter
                have, want = sorted(map(str, have)), sorted(want)
            if have != want:
                problems.append(f"{key} is {state.get(key)!r} there but {expect[key]!r} here")
        if problems:
            raise CheckpointError(f"bitter7 pruner state in {source} does not match this model/config: "
                                  + "; ".join(problems))
        masks = {k: torch.as_tensor(v, dtype=torch.bool).clone() for k, v in state["masks"].items()}
        stray = self._weighted_pruned_units(masks)  # the model's parameters are whole on every rank
        if stray:
            raise CheckpointError(f"the model's weights do not match the bitter7 pruner state in {source}: units it "
                                  f"marks pruned have nonzero weights in {', '.join(stray[:3])}"
                                  f"{' and more' if len(stray) > 3 else ''}; the weights were loaded from another "
                                  "checkpoint than the pruner state (with the Hugging Face Trainer, pass the "
                                  "checkpoint it resumed from as Bitter7Callback(..., resume_from_checkpoint=PATH))")
        for key in self.placeholders:  # a state saved before placeholders were named: all-zero, so pruned
            masks[key][:] = False
        self.masks = masks
        self._broken = None  # the weights come with the state (an event that failed after a refit is undone)
        self.step_count = int(state["step"])
        self.events = list(state.get("events", []))
        self.last_event = self.events[-1] if self.events else None
        reached, wanted = (self.last_event or {}).get("fraction", 0.0), sparsity_reached(self.config, self.step_count)
        if reached > self.config.target_sparsity + 1e-9:
            log_main("bitter7: resumed at step %d from %s with its units pruned to %.4f, beyond this config's "
                     "target_sparsity %.4f: pruned units are never brought back, so the run keeps %.4f",
                     self.step_count, source, reached, self.config.target_sparsity, reached,
                     level=logging.WARNING, log=logger)
        if next_event_step(self.config, self.step_count) is None and reached < wanted - 1e-9:
            log_main("bitter7: resumed at step %d from %s with its units pruned to %.4f, below this config's %.4f, "
                     "but schedule.end_step %d has passed: no event is left to prune further. Move end_step past "
                     "%d (the next event prunes to the schedule's fraction) or call prune_to", self.step_count,
                     source, reached, wanted, self.config.schedule.end_step, self.step_count,
                     level=logging.WARNING, log=logger)
        if self.unstructured is not None:
            self.unstructured.forget()  # load_local_state_dict brings the checkpoint's own
        self._apply_masks_now()

    def _weighted_pruned_units(self, masks: Dict[str, torch.Tensor]) -> List[str]:
        """Parameters (``group (name)``) where a unit ``masks`` prunes has a nonzero element. Local."""
        out = []
        for g in self.groups:
            keep = masks.get(g.key)
            if keep is None or bool(keep.all()):
                continue
            for s in g.slices:
                param = self.model.get_parameter(s.name).detach()
                if bool(param.index_select(s.dim, s.pruned_coords(keep).to(param.device)).any()):
                    out.append(f"{g.key} ({s.name})")
        return out

    def local_state_dict(self) -> dict:
        """This rank's own state: movement accumulators and unstructured masks over its fragments,
        and the activation sums of the training window so far (source ``training``)."""
        return {"version": STATE_VERSION, "rank": self.comm.rank, "world_size": self.comm.world_size,
                "step": self.step_count, "fragments": {n: (f.start, f.numel) for n, f in self.access.fragments.items()},
                "movement": {n: t.clone() for n, t in self.movement.items()},
                "unstructured": ({n: m.clone() for n, m in self.unstructured.pruned.items()}
                                 if self.unstructured is not None else {}),
                "window": self.stats.window_state() if self.stats is not None else {}}

    def check_local_state(self, local: dict, source: str = "bitter7 per-rank state") -> None:
        """Raise ``CheckpointError`` when ``local`` (``source``) was saved with another partitioning,
        or at another step than the replicated state just loaded (a rank file of another save copied
        in: its unstructured masks would bring pruned weights back). Local."""
        frags = {n: (f.start, f.numel) for n, f in self.access.fragments.items()}
        if local.get("fragments") != frags:
            raise CheckpointError(f"{source} was saved with another ZeRO partitioning; "
                                  "resume at the same world size or through a universal checkpoint")
        if local.get("step", self.step_count) != self.step_count:  # files saved before 'step' was kept: not checked
            raise CheckpointError(f"{source} was saved at step {local['step']}, the checkpoint at step "
                                  f"{self.step_count}: a rank file of another save was copied in; copy this "
                                  "tag folder's files again")

    def load_local_state_dict(self, local: Optional[dict]) -> None:
        """Restore :meth:`local_state_dict`; None (world size changed) restarts movement and the
        training window, and re-derives unstructured masks from the weights that are exactly zero."""
        if self.stats is not None:
            self.stats.load_window(local.get("window", {}) if local is not None else {})
        if local is None:
            for t in self.movement.values():
                t.zero_()
            if self.unstructured is not None:
                self.unstructured.rederive_from_zeros()
            self._apply_masks_now()
            return
        self.check_local_state(local)
        for n, t in local.get("movement", {}).items():
            if n in self.movement:
                self.movement[n].copy_(t)
        if self.unstructured is not None:
            self.unstructured.restore(local.get("unstructured", {}))
        self._apply_masks_now()


def _by_group(flat: torch.Tensor, groups: List[UnitGroup]) -> Dict[str, torch.Tensor]:
    """``flat`` (the units of ``groups``, in order) split into one slice per group key."""
    return dict(zip([g.key for g in groups], torch.split(flat, [g.n_units for g in groups])))


def placeholder_groups(model, groups: List[UnitGroup]) -> Set[str]:
    """The unit groups an exported model's config names as placeholders (``placeholder_units``: a
    layer pruned whole keeps one all-zero unit), among those pruned here; ``ValueError`` for a
    named group that is not one unit wide (the config is not the weights')."""
    named = set(getattr(model.config, "placeholder_units", None) or [])
    out = {g.key for g in groups if g.key in named}
    wide = sorted(f"{g.key} ({g.n_units} units)" for g in groups if g.key in out and g.n_units != 1)
    if wide:
        raise ValueError(f"ds_bitter7: the model's config names {', '.join(wide)} as a placeholder_units layer "
                         "(one all-zero unit), but the weights hold more: the config is not the weights' own")
    return out


def _refuse(names: List[str], what: str, fix: str) -> None:
    """``ValueError`` naming the first of ``names``, parameters of pruned units that ``what`` (a
    frozen one, one in no optimizer param group), when there are any."""
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(f"ds_bitter7: {names[0]}{more} {what} but belongs to units bitter7 prunes: {fix}, or "
                         "leave its structure type out of bitter7.structures")
