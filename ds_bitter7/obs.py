"""Score ``obs``: the removal order of a structured Optimal Brain Surgeon on the next layer.

Least-squares compensation (``least_squares.py``) refits the next layer on the kept units, so the
damage of removing a unit is not its own output energy (``fluctuation``: ``Var(x_u) ||W_u||^2``)
but the part of it the kept units cannot reproduce. For one group with input features ``x``
(centered covariance ``S``, damped by ``lam``, below) and next-layer weights ``W`` (``[F, out]``),
removing a unit with features ``U`` and refitting the
rest optimally adds

    cost(U) = tr(W_U^T (H_UU)^-1 W_U),        H = (S + lam I)^-1,

to the output's squared error (Hassibi & Stork's OBS, for a block of rows; ZipLM and SlimGPT use
it for structured units). After the removal the kept rows take the refit and ``H`` loses ``U``:

    W <- W - H[:, U] (H_UU)^-1 W_U,           H <- H - H[:, U] (H_UU)^-1 H[U, :]

Greedy over all groups of one structure type at once: repeatedly remove the unit of least cost
anywhere (costs are squared errors of each block's output, all in the residual stream), updating
only that group. A unit's score is the step at which it goes (already pruned units first), so a
``global`` threshold takes the first ``k`` of one greedy sequence; with ``per_layer`` each group
runs its own greedy. Since a removal changes only its own group, the joint greedy is each
group's own greedy, interleaved: give every unit of a group's sequence the running maximum of the
costs so far as its key, and a stable sort of all keys (ties by group, then place) is the joint
order (the cheapest head of any sequence goes next). So groups are shared out among the ranks,
group ``i`` on rank ``i % world_size``, each holding only its groups' matrices. An event runs in
rounds of three all-reduces: of each group's next key, whose least is the key below which no
unit can still come (the units below it are settled); of the settled counts, which end the rounds
once the prefix the event prunes is settled; and of every unit's key, known or guessed (its
current cost), whose ``k``-th smallest is how far each group orders next round, so a group does
about the work its part of the prefix needs. Then one all-reduce of ``2 n_units`` numbers gives
every rank the same keys, whose owner computed them, so a float difference between ranks can
never split the masks.

Scores are ranks, not magnitudes: ``scope: standardized`` is refused for this score.
``lam = max(ridge, 1e-6) * mean(diag(S))`` over the features of units not yet pruned (least
squares takes the mean over the kept ones); below ``1e-6``, downdates of a rank-deficient
covariance (fewer calibration rows than features) lose every digit of ``H``.

Score ``bitter7_obs`` weights that error per output feature ``j`` by the loss's sensitivity to it,
the diagonal of the output Fisher ``E[g_j^2]`` (``g``: the loss gradient at the layer's output),
read from Adam's second moment of ``W`` at no cost: the gradient of ``W[f, j]`` is ``x_f g_j``
summed over a batch's tokens, so, taking ``x`` and ``g`` as independent,
``v[f, j] ~ c E[x_f^2] E[g_j^2]`` with one factor ``c`` (batch size, Adam's averaging) shared by
every layer, and ``fisher_j = sum_f v[f, j] / sum_f E[x_f^2]`` (``output_fisher``). Then

    cost(U) = tr(W_U^T (H_UU)^-1 W_U D),        D = diag(fisher),

is a second-order estimate of the loss increase up to that common factor (LLM Surgeon's
Kronecker form with a diagonal output factor). The refit of each output column is the same as
unweighted, so the greedy runs on ``W D^(1/2)``. Across layers the costs are then comparable as
loss, where the plain costs compare squared errors of outputs that the loss weighs differently.
A group whose ``exp_avg_sq`` sums to zero while its features are active (a layer the optimizer
never updated) gets NaN weights, so the event prunes nothing rather than all of that layer.

Cost per group, on the rank that owns it: one ``F x F`` float64 matrix and inverse, and ``F^2``
memory traffic per greedy step, on the device of the weights
(``benchmarks/obs_cost.py``). Up to ``STEPS`` units of a type not yet pruned (of a group, with
``per_layer``) the greedy is exact, one unit per step; beyond, each step of a group removes that
group's ``ceil(n / STEPS)`` cheapest at once (``n``: that count), so all groups together take
about ``STEPS`` steps.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch

from .comm import LOCAL, Communicator
from .structures import UnitGroup
from .threshold import n_to_prune

# Exact greedy (one unit per step) up to this many units of a structure type; beyond, each step of
# a group removes its ceil(n / STEPS) cheapest units at once (ZipLM's blocks), so the Python loops
# and the rank-one updates of a large model become a few thousand matrix products.
STEPS = 4096


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b``; NaN where ``a`` is singular (the costs turn NaN and the event prunes nothing)."""
    x, info = torch.linalg.solve_ex(a, b)
    bad = (info != 0).reshape(info.shape + (1,) * (x.dim() - info.dim()))
    return x.masked_fill(bad, float("nan")) if bool(bad.any()) else x


class _GroupState:
    """One group's running ``W`` (refit so far), ``H`` and per-unit costs."""

    def __init__(self, group: UnitGroup, w: torch.Tensor, cov: torch.Tensor, pruned: torch.Tensor, ridge: float):
        ids = group.feature_units.to(w.device)
        by_unit = torch.argsort(ids, stable=True)[int((ids < 0).sum()):]  # features of no unit stay in
        counts = torch.bincount(ids[ids >= 0], minlength=group.n_units).tolist()
        self.features = list(torch.split(by_unit, counts))  # per unit, its feature indices
        self.alive = torch.ones(group.n_units, dtype=torch.bool)
        same = len(set(counts)) == 1 and counts[0] > 0
        self.blocks = torch.stack(self.features) if same else None  # [n_units, d]: features of each unit
        # Damping as least squares': relative to the mean variance of the features still in play
        # (not those of units pruned before), floored at 1e-6: below that the downdates of
        # rank-deficient covariances (fewer rows than features) lose every digit of H.
        live = torch.ones(cov.shape[0], dtype=torch.bool, device=w.device)
        for u in pruned.nonzero().flatten().tolist():
            live[self.features[u]] = False
        diag = cov.diagonal()[live] if bool(live.any()) else cov.diagonal()
        scale = float(diag.mean().clamp(min=0.0)) or 1.0
        cov.diagonal().add_(max(ridge, 1e-6) * scale)  # in place: cov is this group's own copy
        self.h = torch.linalg.inv(cov)
        self.w = w
        self.floor = 0  # units this group keeps whatever their costs (a global threshold's min_keep)
        self.order = pruned.nonzero().flatten().tolist()  # units in removal order, already pruned first
        self.keys = [-math.inf] * len(self.order)  # running maximum of the costs along ``order``
        self.remove(self.order)  # already removed: out of H before any choice
        self.costs = self._costs()

    def _costs(self) -> torch.Tensor:
        """float64[n_units] on the CPU: ``tr(W_U^T (H_UU)^-1 W_U)``, at most the largest finite
        float for a unit still here (NaN stays NaN), inf for removed units: sorting the costs puts
        every unit still here before every removed one."""
        out = torch.full((len(self.features),), float("inf"), dtype=torch.float64)
        alive = self.alive.nonzero().flatten()
        if self.blocks is not None:
            feats = self.blocks.index_select(0, alive.to(self.blocks.device))  # [n_alive, d]
            if feats.shape[1] == 1:  # MLP neurons: H_UU is a number (row norms: no copy of W)
                cost = torch.linalg.vector_norm(self.w, dim=1)[feats[:, 0]].square() / self.h.diagonal()[feats[:, 0]]
            else:  # heads of one width: one batched solve
                w_u = self.w[feats]  # [n_alive, d, out]
                h_uu = self.h[feats[:, :, None], feats[:, None, :]]  # [n_alive, d, d]
                cost = (w_u * _solve(h_uu, w_u)).sum((1, 2))
            out[alive] = cost.cpu()
        else:
            for u in alive.tolist():
                idx = self.features[u]
                if idx.numel():
                    w_u = self.w.index_select(0, idx)
                    h_uu = self.h.index_select(0, idx).index_select(1, idx)
                    out[u] = float((w_u * _solve(h_uu, w_u)).sum())
                else:
                    out[u] = 0.0
        out[alive] = out[alive].clamp(max=torch.finfo(torch.float64).max)
        return out

    def remove(self, units: List[int]) -> None:
        """Take ``units`` out together: refit the kept rows of ``W`` and shrink ``H``."""
        if not units:
            return
        self.alive[units] = False
        idx = torch.cat([self.features[u] for u in units])
        if idx.numel() == 0:
            return
        h_rows = self.h.index_select(0, idx)  # [|U|, F]: H is symmetric, rows are contiguous
        b_t = _solve(h_rows.index_select(1, idx), h_rows)  # B^T = (H_UU)^-1 H[U, :]
        self.w.addmm_(b_t.T, self.w.index_select(0, idx), alpha=-1.0)  # in place: H is F x F
        self.h.addmm_(b_t.T, h_rows, alpha=-1.0)
        self.w.index_fill_(0, idx, 0.0)
        self.h.index_fill_(0, idx, 0.0)
        self.h.index_fill_(1, idx, 0.0)

    def advance(self, count: int, block: int, until: float = math.inf) -> None:
        """Order up to ``count`` more units, the ``block`` cheapest per refit, while the next key is
        at most ``until`` (and no cost is NaN), down to ``floor`` units alive."""
        while count > 0 and int(self.alive.sum()) > self.floor and self.next_key() <= until:
            k = min(block, count, int(self.alive.sum()) - self.floor)
            picked = torch.sort(self.costs, stable=True).indices[:k]  # ties in unit order
            for c in self.costs[picked].tolist():
                self.keys.append(max(self._last_key(), c))
            self.order += picked.tolist()
            count -= k
            self.remove(picked.tolist())
            self.costs = self._costs()

    def next_key(self) -> float:
        """The smallest key a unit ordered next can get: inf when no unit is left to order, NaN
        when a cost is NaN."""
        if bool(torch.isnan(self.costs).any()):
            return math.nan
        if int(self.alive.sum()) <= self.floor:
            return math.inf
        return max(self._last_key(), float(self.costs.min()))

    def estimates(self) -> torch.Tensor:
        """float64[n_units]: the key of each unit ordered, a guess at it for the others (the
        current cost, at least the last key: refits mostly raise costs), inf for the ``floor``
        units a group at its floor keeps."""
        out = torch.full((len(self.features),), math.inf, dtype=torch.float64)
        out[self.order] = torch.tensor(self.keys, dtype=torch.float64)
        if int(self.alive.sum()) > self.floor:
            out[self.alive] = self.costs[self.alive].clamp(min=self._last_key())
        return out

    def _last_key(self) -> float:
        return self.keys[-1] if self.keys else -math.inf

    def sequence(self) -> Tuple[List[int], List[float]]:
        """Every unit in this group's order with its key: the units not ordered yet follow by their
        current costs, with key inf (after every ordered unit of every group)."""
        rest = torch.sort(self.costs, stable=True).indices[:int(self.alive.sum())].tolist()
        return self.order + rest, self.keys + [math.inf] * len(rest)


def output_fisher(groups: List[UnitGroup], column_sums: Dict[str, torch.Tensor],
                  stats: Dict) -> Dict[str, torch.Tensor]:
    """Per group key, float64[out]: ``sum_f v[f, j] / sum_f E[x_f^2]`` (module docstring), from
    ``column_sums`` (``sum_f v[f, j]`` of the next layer's weight, over all ranks) and the
    gathered statistics. Zeros where no feature is active (the layer's error then costs nothing);
    NaN (the event prunes nothing) where the energy is not finite, or where features are active
    but ``exp_avg_sq`` is all zero: zero weights would make every unit of that layer free."""
    out = {}
    for g in groups:
        st = stats[g.key]
        energy = float((st.var + st.mean.square()).sum())
        sums = column_sums[g.key].to(torch.float64)
        if not math.isfinite(energy) or (energy > 0 and not bool(sums.ne(0).any())):
            out[g.key] = torch.full_like(sums, float("nan"))
        else:
            out[g.key] = sums / energy if energy > 0 else torch.zeros_like(sums)
    return out


def _state(g: UnitGroup, model, stats: Dict, masks: Dict[str, torch.Tensor], ridge: float,
           output_weights: Optional[torch.Tensor] = None, consume: bool = False) -> Optional[_GroupState]:
    """A group's greedy state, or None when its weights, statistics or output weights are not
    finite. ``consume``: the caller gives up the group's ``F x F`` second moment, which becomes
    the covariance in place (one ``F x F`` fewer at the peak)."""
    w = model.get_parameter(g.out_weight).detach().to(torch.float64)
    w = (w if g.out_in_dim == 0 else w.T).clone(memory_format=torch.contiguous_format)  # [F, out]
    if output_weights is not None:
        w.mul_(output_weights.to(w).clamp(min=0.0).sqrt())  # the greedy on W D^(1/2)
    st = stats[g.key]
    mean = st.mean.to(st.second_moment.device)
    if consume:
        cov = st.second_moment.addr_(mean, mean, alpha=-1.0)
    else:  # a new tensor (no F x F of mean products beside it)
        cov = torch.addr(st.second_moment, mean, mean, alpha=-1.0)
    cov = cov.to(device=w.device, dtype=torch.float64)
    if not (bool(torch.isfinite(cov).all()) and bool(torch.isfinite(w).all())):
        return None
    return _GroupState(g, w, cov, ~masks[g.key], ridge)


def _merge(groups: List[UnitGroup], starts: List[int], keys: torch.Tensor,
           positions: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The joint order from each group's own: ``keys`` (a unit's running maximum cost along its
    group's sequence) and ``positions`` (its place in that sequence), float64 over all units. A
    stable sort of the keys, laid out group by group in sequence order, breaks ties by group, then
    position: what removing the cheapest unit of any group each step gives (module docstring).
    ``starts``: where each group's units begin in the flat tensors."""
    seq = torch.cat([starts[i] + positions[starts[i]:starts[i + 1]].argsort() for i in range(len(groups))])
    order = torch.empty_like(keys)
    order[seq[torch.sort(keys[seq], stable=True).indices]] = torch.arange(keys.numel(), dtype=torch.float64)
    return {g.key: order[starts[i]:starts[i + 1]].clone() for i, g in enumerate(groups)}


def greedy_groups(n_groups: int, comm: Communicator) -> List[int]:
    """Indices of the groups (of one structure type) whose greedy this rank runs and whose
    matrices only it needs: group ``i`` on rank ``i % world_size``."""
    return list(range(comm.rank, n_groups, comm.world_size))


def removal_order(groups: List[UnitGroup], model, stats: Dict, masks: Dict[str, torch.Tensor], ridge: float,
                  per_layer: bool = False, fraction: Optional[float] = None, min_keep: int = 0,
                  output_weights: Optional[Dict[str, torch.Tensor]] = None,
                  comm: Communicator = LOCAL, free_stats: bool = False) -> Dict[str, torch.Tensor]:
    """float64[n_units] per group key: the greedy step at which each unit is removed (module
    docstring); all NaN (the event then prunes nothing) when weights or statistics are not
    finite or a cost the greedy computes is NaN. ``masks``: True = kept; units already pruned
    come first, in index order. ``per_layer``: each group's own greedy, alone. ``fraction``: only the first
    ``floor(fraction * n)`` (per group with ``per_layer``) are the greedy's, not counting the
    ``min_keep`` units per group that a global threshold keeps; the rest follow in an order of no
    meaning. ``output_weights``: per group key, the weight of each output feature's squared error
    (``bitter7_obs``: ``output_fisher``); None weighs all alike. ``comm``: the ranks that share the
    work, group ``i`` on rank ``i % world_size`` (default: this process alone). ``free_stats``:
    drop each group's ``F x F`` from ``stats`` (the caller's dict) once its greedy state holds its
    own copy. Collective over ``comm``; the result is identical on every rank."""
    weights = output_weights or {}
    n = [g.n_units for g in groups]
    mine = greedy_groups(len(groups), comm)
    starts = [0] + torch.tensor(n).cumsum(0).tolist()
    # Units per step: ceil(n / STEPS) of those not yet pruned, per group with ``per_layer``, else of
    # the whole type (so at most about STEPS refits of a layer's H on all ranks together).
    alive = [int(masks[g.key].sum()) for g in groups]
    blocks = [max(1, -(-(a if per_layer else sum(alive)) // STEPS)) for a in alive]
    keys, positions = torch.zeros(sum(n), dtype=torch.float64), torch.zeros(sum(n), dtype=torch.float64)

    def build(i: int) -> Optional[_GroupState]:
        state = _state(groups[i], model, stats, masks, ridge, weights.get(groups[i].key), consume=free_stats)
        if free_stats:
            stats[groups[i].key] = dataclasses.replace(stats[groups[i].key], second_moment=None)
        if state is not None and not per_layer and fraction is not None:
            state.floor = min(min_keep, int(state.alive.sum()))
        return state

    def record(i: int, state: Optional[_GroupState]) -> None:
        if state is None or bool(torch.isnan(state.costs).any()):
            keys[starts[i]:starts[i + 1]] = math.nan
            return
        units, unit_keys = state.sequence()
        idx = torch.tensor(units) + starts[i]
        keys[idx] = torch.tensor(unit_keys, dtype=torch.float64)
        positions[idx] = torch.arange(len(units), dtype=torch.float64)

    def each_layer() -> None:  # one group's matrices in memory at a time
        for i in mine:
            state = build(i)
            if state is not None:
                count = groups[i].n_units if fraction is None else n_to_prune(fraction, groups[i].n_units)
                state.advance(count - len(state.order), blocks[i])
            record(i, state)

    def advance_all(states: Dict[int, Optional[_GroupState]], until: float) -> None:
        for i, state in states.items():
            if state is not None:
                state.advance(n[i], blocks[i], until)

    def record_all(states: Dict[int, Optional[_GroupState]]) -> None:
        for i, state in states.items():
            record(i, state)

    if per_layer:
        comm.call("the obs order", each_layer)
    else:
        states = comm.call("the obs order", lambda: {i: build(i) for i in mine})
        limit = sum(n) if fraction is None else n_to_prune(fraction, sum(n))
        # Rounds: the ranks agree on the key below which no unit can still come (the least next key
        # of a group not done) and stop once that settles the first ``limit`` units; else every
        # group orders its units up to the limit-th smallest key, known or guessed (``estimates``).
        while True:
            nxt = torch.zeros(len(groups), dtype=torch.float64)
            for i, state in states.items():
                nxt[i] = state.next_key() if state is not None else math.nan
            nxt = comm.all_reduce_sum(nxt)
            bound = float(nxt.min()) if len(groups) else math.inf
            if math.isnan(bound) or bound == math.inf:  # NaN: the event prunes nothing
                break
            target = math.inf
            if fraction is not None:
                settled = torch.zeros(len(groups), dtype=torch.float64)
                guess = torch.zeros(sum(n), dtype=torch.float64)
                for i, state in states.items():
                    settled[i] = bisect.bisect_left(state.keys, bound)  # keys below every key to come
                    guess[starts[i]:starts[i + 1]] = state.estimates()
                if float(comm.all_reduce_sum(settled).sum()) >= limit:
                    break
                target = float(comm.all_reduce_sum(guess).kthvalue(limit).values)
            comm.call("the obs order", advance_all, states, target)
        comm.call("the obs order", record_all, states)
    keys, positions = comm.all_reduce_sum(torch.stack([keys, positions])).unbind(0)  # one owner each
    if bool(torch.isnan(keys).any()):
        return {g.key: torch.full((g.n_units,), math.nan, dtype=torch.float64) for g in groups}
    if per_layer:
        return {g.key: positions[starts[i]:starts[i + 1]].clone() for i, g in enumerate(groups)}
    return _merge(groups, starts, keys, positions)

