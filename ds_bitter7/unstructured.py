"""Unstructured pruning (the method's original, AdamWPrune form): single weights of block matrices.

Masks are per element and per rank (each rank keeps a bool mask over its own fragments); the
threshold is the exact k-th smallest score over all ranks, found by radix select.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch

from .comm import log_main
from .config import Scope
from .threshold import key_to_score, kth_keys, n_to_prune, score_keys, tie_quotas

logger = logging.getLogger(__name__)


class UnstructuredMasks:
    """Per-element masks over the local fragments of the block weight matrices."""

    def __init__(self, pruner, names: List[str]):
        self.pruner = pruner
        self.names = names
        self.sizes = [pruner.model.get_parameter(n).numel() for n in names]
        frags = pruner.access.fragments
        self.pruned: Dict[str, torch.Tensor] = {n: torch.zeros(frags[n].numel, dtype=torch.bool,
                                                               device=frags[n].flat.device)
                                                for n in names if n in frags}
        self.pruned_counts = torch.zeros(len(names), dtype=torch.long)  # global, after the last event

    def _group_of(self) -> List[int]:
        per_layer = self.pruner.config.scope == Scope.per_layer
        return list(range(len(self.names))) if per_layer else [0] * len(self.names)

    def _local_keys(self) -> Tuple[Dict[str, torch.Tensor], bool]:
        """(int32 keys per local fragment, whether any score was NaN/Inf)."""
        keys, finite = {}, True
        for name, pruned in self.pruned.items():
            frag = self.pruner.access.fragments[name]
            parts = []
            for s, n in _ranges(frag.numel, self.pruner._chunk):
                scores = self.pruner.scorer.fn(self.pruner._score_inputs(frag, frag.start + s, n))
                finite = finite and bool(torch.isfinite(scores).all())
                parts.append(score_keys(scores, pruned[s:s + n]))
            keys[name] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
        return keys, finite

    def event(self, fraction: float, event: dict) -> None:
        """Prune to ``fraction`` of the elements (globally or per matrix). Collective."""
        comm, pcomm = self.pruner.score_comm, self.pruner.comm
        groups = self._group_of()
        n_groups = max(groups) + 1
        error, finite = None, True
        try:
            keys, finite = self._local_keys()
        except Exception as e:  # noqa: BLE001 - a missing optimizer state, or this rank's own failure: on every rank
            error, keys = e, {}
        pcomm.raise_if_any(error, "unstructured scoring")
        if pcomm.any(not finite):  # the same decision on every rank, as for structured units
            event["skipped"].append("unstructured")
            log_main("bitter7 step %d: unstructured scores contain NaN/Inf; this event prunes nothing",
                     self.pruner.step_count, level=logging.WARNING, log=logger)
            return
        totals = torch.zeros(n_groups, dtype=torch.long)
        for g, size in zip(groups, self.sizes):
            totals[g] += size
        k = torch.tensor([n_to_prune(fraction, int(n)) for n in totals])
        k = torch.maximum(k, torch.zeros_like(k).index_add_(0, torch.tensor(groups), self.pruned_counts))
        order = [(i, n) for i, n in enumerate(self.names) if n in keys]
        thresh, ties = kth_keys([keys[n] for _, n in order], [groups[i] for i, _ in order],
                                k.clamp_min(1), comm)
        world, rank = comm.world_size, comm.rank if comm.world_size > 1 else 0
        tie_counts = torch.zeros(len(self.names), world, dtype=torch.long)
        for i, n in order:
            tie_counts[i, rank] = int((keys[n] == thresh[groups[i]]).sum())
        quota = tie_quotas(comm.all_reduce_sum(tie_counts), ties, groups)
        counts = torch.zeros(len(self.names), dtype=torch.long)
        for i, n in order:
            g = groups[i]
            if int(k[g]) == 0:
                continue
            key = keys[n]
            new = key < thresh[g]
            tied = (key == thresh[g]).nonzero().flatten()[: int(quota[i, rank])]
            new[tied] = True
            self.pruned[n] = self.pruned[n] | new  # a new tensor: ``snapshot`` keeps the old one
            counts[i] = int(self.pruned[n].sum())
        self.pruned_counts = comm.all_reduce_sum(counts)
        event["sparsity"]["unstructured"] = float(self.pruned_counts.sum()) / float(sum(self.sizes))
        event["thresholds"]["unstructured"] = [float(v) for v in key_to_score(thresh)]

    def snapshot(self) -> tuple:
        """The masks as they are (references: ``event`` replaces, never changes, a mask tensor)."""
        return dict(self.pruned), self.pruned_counts.clone()

    def rollback(self, snapshot: tuple) -> None:
        """Back to a ``snapshot`` (local): an event that failed before its masks zeroed anything."""
        pruned, counts = snapshot
        self.pruned.update(pruned)
        self.pruned_counts = counts

    def forget(self) -> None:
        """Drop every mask (local): a checkpoint being loaded brings its own, and the masks of a run
        that pruned further than it must not zero weights it has alive."""
        for m in self.pruned.values():
            m.zero_()
        self.pruned_counts.zero_()

    def restore(self, saved: Dict[str, torch.Tensor]) -> None:
        """This rank's masks from its state file, onto its fragments' devices (collective)."""
        for n, m in saved.items():
            if n in self.pruned:
                self.pruned[n] = m.to(device=self.pruned[n].device, dtype=torch.bool).clone()
        self.recount()  # the next event keeps at least these

    def rederive_from_zeros(self) -> None:
        """After a re-partitioned resume: pruned = weights that are exactly zero (collective)."""
        for n in self.names:
            if n in self.pruned:
                self.pruned[n] = self.pruner.access.master(self.pruner.access.fragments[n]).eq(0)
        self.recount()

    def recount(self) -> None:
        """Global pruned counts from every rank's masks, after they were restored (collective)."""
        counts = torch.zeros(len(self.names), dtype=torch.long)
        for i, n in enumerate(self.names):
            if n in self.pruned:
                counts[i] = int(self.pruned[n].sum())
        self.pruned_counts = self.pruner.score_comm.all_reduce_sum(counts)

    def drop_masks(self) -> Dict[str, torch.Tensor]:
        return {n: m for n, m in self.pruned.items() if bool(m.any())}

    def report(self) -> List[dict]:
        return [{"key": n, "kind": "unstructured", "units_kept": size - int(c), "units_total": size,
                 "params_kept": size - int(c), "params_total": size}
                for n, size, c in zip(self.names, self.sizes, self.pruned_counts.tolist())]


def _ranges(numel: int, chunk: int = 1 << 20):
    for s in range(0, numel, chunk):
        yield s, min(chunk, numel - s)
