"""Activation statistics of every unit group, combined exactly across ranks.

For each unit group (one MLP or one attention block) a forward pre-hook on ``group.out_module``
(GPT-2 ``c_proj``; LLaMA ``down_proj`` / ``o_proj``) sees that module's input: one feature per
MLP neuron (after the activation function and, for SwiGLU, after the gate product) or, for an
attention unit, its heads' slice of the attention output. Per input feature the hook accumulates
float64 count, sum and sum of squares (and, for least squares, the second-moment matrix
``X^T X``). ``gather()`` packs every group's vector sums into one vector and all-reduces it once
(and each group's matrix on its own, on the device it was summed on), so the result is the
single-process statistic over the union of all ranks' data. Padding does not count:
when the model is called with an ``attention_mask`` (``[batch, seq]``, by keyword or position),
the rows of masked-out positions are dropped (a forward pre-hook on the model reads the mask).

Two sources (``bias_compensation.source``):
- ``calibration``: ``gather()`` runs ``num_batches`` batches of ``calibration_data`` (every rank
  the same number: the minimum over ranks) in eval mode under ``torch.no_grad()``. With
  ``layers_per_pass`` the pruner asks for the F x F matrices a few groups per pass
  (``gather(matrices=...)``, ``with_matrices``), every pass of one event over the same batches
  (``same_batches``), and keeps only those it needs next.
- ``training``: the hooks stay registered and keep the training forward passes (train mode only,
  not activation-checkpoint recomputes; every micro-batch under gradient accumulation) of the last
  ``window`` optimizer steps made since the last pruning event, summed per step (steps as the
  pruner counts them: a step skipped on fp16 overflow does not count, its forwards join the
  next); ``gather()`` reduces them. No extra forward pass is run. The F x F matrix (least
  squares, scores ``obs`` and ``bitter7_obs``) is recorded only in the ``window`` steps before
  each scheduled event, into one running sum per group (one float64 ``F x F`` per group however
  many passes the window holds, freed at the first training forward after the event); a manual
  ``prune_to`` inside that window uses the part seen so far.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import functools
import inspect
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Collection, Deque, Dict, List, Optional, Tuple

import torch

from .comm import is_main_process, log_main
from .config import CompensationMode, StatsSource, enum_name
from .schedule import next_event_step

logger = logging.getLogger(__name__)


@dataclass
class UnitStats:
    """Statistics of one group's input features (the inputs of ``group.out_module``)."""

    count: int  # rows (tokens) seen, summed over ranks
    mean: torch.Tensor  # float64[n_features]
    var: torch.Tensor  # float64[n_features], population variance (divides by count)
    second_moment: Optional[torch.Tensor] = None  # float64[n_features, n_features]: E[x x^T], on the
    # device the activations were on (the vectors above are on the CPU)


class _Sums:
    """Running float64 sums over the rows of one module input."""

    def __init__(self, n_features: int, with_matrix: bool, device: Optional[torch.device] = None):
        """Zero sums on ``device`` (default the CPU): that of the activations they will sum, so no
        ``F x F`` of zeros is made on the host for a GPU's rows."""
        self.count = 0
        self.sum = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(n_features, n_features, dtype=torch.float64, device=device) if with_matrix else None

    def add_rows(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [rows, n_features]
        if self.sum.device != x.device:  # accumulate where the activations are (no sync per pass)
            self._to(x.device)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.square().sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)  # in place: no F x F product beside the sum

    def _to(self, device: torch.device) -> None:
        self.sum, self.sumsq = self.sum.to(device), self.sumsq.to(device)
        if self.xtx is not None:
            self.xtx = self.xtx.to(device)

    def add(self, other: _Sums) -> None:
        self._to(other.sum.device)  # where other's sums are; other is left as it is
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        if self.xtx is not None:
            self.xtx += other.xtx

    def state_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq, "xtx": self.xtx}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> _Sums:
        """Sums saved by :meth:`state_dict`, on ``device``."""
        sums = cls.__new__(cls)
        sums.count = int(state["count"])
        sums.sum, sums.sumsq = (state[k].to(device, torch.float64, copy=True) for k in ("sum", "sumsq"))
        sums.xtx = None if state["xtx"] is None else state["xtx"].to(device, torch.float64, copy=True)
        return sums

    def pack(self) -> List[torch.Tensor]:
        """Count, sum and sum of squares (not the F x F matrix), on the CPU."""
        return [torch.tensor([float(self.count)], dtype=torch.float64), self.sum.cpu(), self.sumsq.cpu()]


def needs_stats(config) -> bool:
    """Whether a parsed ``Bitter7Config`` needs activation statistics."""
    from .scores import get_scorer

    return bool(config.bias_compensation.enabled or get_scorer(config.score).needs_stats)


BATCH_FORM = ("each batch is a dict of the model's keyword inputs, such as {'input_ids': LongTensor[batch, seq]}, "
              "or an input_ids tensor")


def calibration_data_problem(data, num_batches: int) -> Optional[str]:
    """What is wrong with ``calibration_data`` on this rank (its container and, where it can be
    indexed, its first ``num_batches`` batches), or None. Local; never starts iterating ``data``
    (a DataLoader would start its workers)."""
    iterable = isinstance(data, collections.abc.Iterable) or hasattr(type(data), "__getitem__")  # map-style Dataset
    if isinstance(data, (str, bytes, collections.abc.Mapping, torch.Tensor)) or not iterable:
        what = "a dict (one batch?)" if isinstance(data, collections.abc.Mapping) else f"a {type(data).__name__}"
        return f"got {what}; pass a list (or iterable) of batches: {BATCH_FORM}"
    try:
        if len(data) == 0:
            return "no batch (an empty container)"
    except TypeError:  # no length (a DataLoader over an IterableDataset says so only when asked)
        pass
    if isinstance(data, collections.abc.Sequence):
        for i, batch in enumerate(data[:num_batches]):
            if isinstance(batch, collections.abc.Mapping):
                bad = next((k for k, v in batch.items() if isinstance(v, (list, tuple))), None)
                if bad is not None:  # token ids not made a tensor
                    return (f"batch {i}'s {bad!r} is a {type(batch[bad]).__name__}, not a tensor "
                            "(a tokenizer gives tensors with return_tensors='pt')")
            elif not torch.is_tensor(batch):
                return f"batch {i} is a {type(batch).__name__}: {BATCH_FORM}"
    return None


def _calibration_error(config) -> str:
    why = ("bias_compensation.enabled" if config.bias_compensation.enabled
           else f"score {enum_name(config.score)!r}")
    return (f"ds_bitter7: {why} with bias_compensation.source = 'calibration' needs calibration data: "
            "pass calibration_data=<iterable of model inputs> to ds_bitter7.initialize / attach, or set "
            "bias_compensation.source to 'training'")


class ActivationStats:
    """Mean and variance of every unit group's input features, gathered across ranks."""

    def __init__(self, pruner, calibration_data=None):
        cfg = pruner.config.bias_compensation
        self.pruner = pruner
        self.model = pruner.model
        self.source = StatsSource(cfg.source)
        self.num_batches = cfg.num_batches
        self.window = cfg.window
        self.passes = 0  # calibration passes run so far (each over num_batches batches)
        self._batches: Optional[list] = None  # inside ``same_batches``: the batches every pass reads
        self._pinned = False
        self.with_matrix = (CompensationMode(cfg.mode) == CompensationMode.least_squares
                            or pruner.scorer.uses_covariance)
        # F x F of at most this many groups per calibration pass (0: all in one pass)
        self.layers_per_pass = cfg.layers_per_pass if self.with_matrix else 0
        from .compensation import check_compensation

        check_compensation(pruner.groups, pruner.config)  # the config's: the same on every rank
        if self.source == StatsSource.calibration:  # data given to some ranks only fails them all
            missing = ValueError(_calibration_error(pruner.config)) if calibration_data is None else None
            pruner.comm.raise_if_any(missing, "checking calibration_data", ValueError)
        # a one-shot iterator (generator): its first batches serve every event, not only the first.
        # Collective on every rank, whatever it holds (a generator on one rank, a list or None on
        # another): a failure on one rank fails every rank
        calibration_data = pruner.comm.call("reading calibration_data", lambda: list(
            itertools.islice(calibration_data, self.num_batches))
            if isinstance(calibration_data, collections.abc.Iterator) else calibration_data)
        if self.source == StatsSource.calibration:  # now, not at the first event (hours later)
            problem = calibration_data_problem(calibration_data, self.num_batches)
            pruner.comm.raise_if_any(ValueError(f"ds_bitter7: calibration_data: {problem}") if problem else None,
                                     "checking calibration_data", ValueError)
        self.calibration_data = calibration_data
        self.groups = list(pruner.groups)
        self._n_features = {g.key: g.feature_units.numel() for g in self.groups}
        self._current: Optional[Dict[str, _Sums]] = None  # calibration: sums of the running pass
        # training: per group, ((events so far, step), sums) of each of the last `window` optimizer
        # steps (with the F x F matrix: one entry, the window before the next event; see
        # `_window_tag`); only passes made since the last event count, so a window restarts after
        # every event (and ``unit_scores()`` between events consumes nothing).
        self._recent: Dict[str, Deque[Tuple[Tuple[int, int], _Sums]]] = {
            g.key: collections.deque(maxlen=1 if self.with_matrix else self.window) for g in self.groups}
        self._handles = []
        self._row_mask: Optional[torch.Tensor] = None  # kept rows of the running forward (padding)
        self._warned_mask = False
        if self.source == StatsSource.training:
            self._register()

    # -- hooks -------------------------------------------------------------------------------------
    def _register(self) -> None:
        for g in self.groups:
            module = self.model.get_submodule(g.out_module)
            self._handles.append(module.register_forward_pre_hook(self._hook(g.key)))
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))

    def _capture_mask(self, module, args, kwargs) -> None:
        """Remember which token positions of this forward are real (``attention_mask`` != 0, given
        by keyword or by position). A mask of another form (4-D) is not read, and that is said once."""
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:  # model(input_ids, attention_mask), as a training loop may call it
            mask = _bound_argument(module, args, kwargs, "attention_mask")
        self._row_mask = mask.reshape(-1) != 0 if torch.is_tensor(mask) and mask.dim() == 2 else None
        if torch.is_tensor(mask) and self._row_mask is None:
            self._unread_mask(f"an attention_mask of shape {tuple(mask.shape)}, not [batch, seq]")

    def _unread_mask(self, why: str) -> None:
        if not self._warned_mask:
            self._warned_mask = True
            log_main("bitter7: %s: padded positions, if any, count in the activation statistics (pass a "
                     "[batch, seq] attention_mask to drop them)", why, level=logging.WARNING, log=logger)

    def remove_hooks(self) -> None:
        """Unregister every forward hook (the pruner is being detached)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, key: str):
        n = self._n_features[key]

        def pre_hook(module, args):
            x = args[0]
            if x.shape[-1] != n:
                raise RuntimeError(f"ds_bitter7: input of the out projection of {key} has "
                                   f"{x.shape[-1]} features, expected {n}")
            x = x.detach().reshape(-1, n)
            keep = self._row_mask
            if keep is not None and keep.numel() == x.shape[0]:  # drop padded positions
                x = x[keep.to(x.device)]
            elif keep is not None:
                self._unread_mask(f"the attention_mask has {keep.numel()} positions, the input of {key} {x.shape[0]} rows")
            if self._current is not None:  # a calibration pass
                self._current[key].add_rows(x)
            elif module.training and not _in_backward():  # a training forward
                tag, recent = self._window_tag(), self._recent[key]
                if recent and recent[-1][0][0] != self._epoch():
                    recent.clear()  # passes before the last event never count again: free them now
                if tag is not None:
                    if not recent or recent[-1][0] != tag:
                        recent.append((tag, _Sums(n, self.with_matrix, x.device)))
                    recent[-1][1].add_rows(x)
        return pre_hook

    # -- gathering ---------------------------------------------------------------------------------
    def gather(self, release: bool = False, matrices: Optional[Collection[str]] = None) -> Dict[str, UnitStats]:
        """Statistics per group key, identical on every rank (the union of all ranks' data). The
        vectors are on the CPU; the F x F second moments stay on the device they were summed on
        (the activations'), where ``obs`` and least squares then work.

        ``release`` (the pruning event): with source ``training``, free the window's sums as they
        are reduced, so the device never holds both (an event starts a new window anyway); without
        it (``unit_scores()`` between events) they are kept. ``matrices`` (source ``calibration``):
        the group keys whose F x F this pass sums (default: every group's, when they are needed);
        the others' ``second_moment`` is None. Collective: every rank must call this, in the same
        order, with the same ``matrices``.
        """
        if self.source == StatsSource.calibration:
            return self._reduce(self._run_calibration(matrices), consume=True, matrices=matrices)
        local = {}
        for g in self.groups:
            entries = [s for (epoch, _), s in self._recent[g.key] if epoch == self._epoch()]  # since the last event
            if len(entries) == 1:  # always so with the F x F matrix: read in place, not copied
                local[g.key] = entries[0]
            else:
                local[g.key] = _Sums(self._n_features[g.key], self.with_matrix, _model_device(self.model))
                for s in entries:
                    local[g.key].add(s)
        try:
            return self._reduce(local, consume=release)
        finally:
            if release:
                for recent in self._recent.values():
                    recent.clear()  # a forward after this (same window, no event yet) starts new sums

    def window_state(self) -> Dict[str, list]:
        """Source ``training``: this rank's sums of the window so far, per group (local; they go
        into its checkpoint file, so a run resumed inside a window sees the same rows at the event)."""
        return {key: [(tag, sums.state_dict()) for tag, sums in recent] for key, recent in self._recent.items()}

    def load_window(self, saved: Dict[str, list]) -> None:
        """Replace the window by ``saved`` (:meth:`window_state`; empty: the window restarts). A
        window recorded under another config (another source, or with/without the ``F x F``
        matrix, or other feature counts) restarts too, with a warning."""
        fits = self.source == StatsSource.training and all(
            key in self._recent and all((st["xtx"] is not None) == self.with_matrix
                                        and st["sum"].numel() == self._n_features[key] for _, st in entries)
            for key, entries in saved.items())
        if not fits:
            if any(saved.values()):
                log_main("bitter7: the checkpoint's training window was recorded under another bias_compensation "
                         "config: it restarts", level=logging.WARNING, log=logger)
            saved = {}
        device = _model_device(self.model)
        for key, recent in self._recent.items():
            recent.clear()
            for tag, state in saved.get(key, []):
                recent.append((tuple(tag), _Sums.from_state(state, device)))

    @contextlib.contextmanager
    def same_batches(self):
        """Inside, every calibration pass reads the batches the first one took (one event's passes
        see the same data however ``calibration_data`` iterates)."""
        self._batches, self._pinned = None, True
        try:
            yield
        finally:
            self._batches, self._pinned = None, False

    def _window_tag(self) -> Optional[Tuple[int, int]]:
        """(events so far, step) under which a training forward's rows are summed, or None when they
        are not kept. Without the F x F matrix: the optimizer step the forward belongs to (the
        deque keeps the last ``window``). With it (float64, ``F x F`` per group): the next
        scheduled event's step, and only within ``window`` steps of it, so every kept pass falls
        in that window and one running sum per group holds them all."""
        step = self.pruner.step_count
        if self.with_matrix:
            nxt = next_event_step(self.pruner.config, step)
            if nxt is None or nxt - step > self.window:  # this forward's step is step_count + 1
                return None
            step = nxt
        return self._epoch(), step

    def _epoch(self) -> int:
        """Pruning events so far: training passes are tagged with it."""
        return len(self.pruner.events)

    def with_matrices(self, stats: Dict[str, UnitStats], keys: List[str],
                      keep: Callable[[str], bool]) -> Dict[str, UnitStats]:
        """``stats`` with the F x F of the ``keys`` that ``keep``, summed ``layers_per_pass`` groups
        per calibration pass; a pass's other matrices are freed as soon as it is reduced. So a
        rank holds at most its kept matrices and one pass's. Collective: every rank must call
        this with the same ``keys``."""
        out = dict(stats)
        for part in chunks(keys, self.layers_per_pass):
            chunk = self.gather(matrices=part)
            out.update({key: chunk[key] for key in part if keep(key)})
            del chunk
        return out

    def _wants_matrix(self, key: str, matrices: Optional[Collection[str]]) -> bool:
        """Whether a pass sums (and ``_reduce`` reduces) group ``key``'s F x F: ``matrices`` None
        means every group's, when the matrix is needed at all."""
        return self.with_matrix and (matrices is None or key in matrices)

    def _run_calibration(self, matrices: Optional[Collection[str]] = None) -> Dict[str, _Sums]:
        comm = self.pruner.comm
        batches = self._batches
        if batches is None:
            batches = comm.call("reading calibration_data", lambda: list(itertools.islice(
                iter(self.calibration_data), self.num_batches)))  # a failure on one rank fails every rank
            if self._pinned:
                self._batches = batches
        # Every rank runs the same number of batches: the minimum over ranks (no rank waits).
        n = -int(comm.all_reduce_max(torch.tensor([-len(batches)], dtype=torch.int64)).item())
        if n == 0:
            raise ValueError("ds_bitter7: calibration_data yielded no batch on at least one rank")
        if n < len(batches):
            log_main("bitter7 calibration: some rank has only %d batch(es); every rank runs %d", n, n,
                     level=logging.WARNING, log=logger)
        device = _model_device(self.model)
        was_training = self.model.training
        self.passes += 1
        self._current = {g.key: _Sums(self._n_features[g.key], self._wants_matrix(g.key, matrices), device)
                         for g in self.groups}
        self._register()
        error = None
        try:
            self.model.eval()
            with torch.no_grad():
                for i, batch in enumerate(_progress(batches[:n])):
                    _forward(self.model, batch, device, i)
        except Exception as err:  # noqa: BLE001 - a bad batch or OOM on one rank fails every rank
            error = err
        finally:
            current, self._current = self._current, None
            self.remove_hooks()
            self.model.train(was_training)
        comm.raise_if_any(error, "the calibration forward pass")
        return current

    def _reduce(self, local: Dict[str, _Sums], consume: bool,
                matrices: Optional[Collection[str]] = None) -> Dict[str, UnitStats]:
        """Every group's statistics summed over ranks (the F x F of ``matrices``, default all, when
        the matrix is needed); with ``consume``, each local F x F is freed once reduced (the
        calibration pass's own sums, or the training window's at an event). Every count is
        checked before any matrix is reduced or freed."""
        comm = self.pruner.comm
        parts = [p for g in self.groups for p in local[g.key].pack()]
        total = comm.all_reduce_sum(torch.cat(parts))  # one reduce for every group's vectors
        sizes = [1 + 2 * self._n_features[g.key] for g in self.groups]
        rows = dict(zip([g.key for g in self.groups], torch.split(total, sizes)))
        counts = {key: int(row[0].item()) for key, row in rows.items()}
        for g in self.groups:
            if counts[g.key] == 0:
                why = ("every position of the calibration batches is masked out by their attention_mask"
                       if self.source != StatsSource.training else
                       "source 'training' needs training forward passes before each event; with least squares "
                       "or score 'obs' / 'bitter7_obs' only those of the `window` steps before a scheduled event "
                       "are kept: for an event at another time use source 'calibration'")
                raise RuntimeError(f"ds_bitter7: no activations of {g.key} were observed on any rank ({why})")
        out = {}
        for g in self.groups:
            count, (s, sq) = counts[g.key], rows[g.key][1:].chunk(2)
            mean = s / count
            var = (sq / count - mean.square()).clamp_(min=0.0)
            second = None
            if self._wants_matrix(g.key, matrices):  # decided alike on every rank, as the pass's sums were
                # one reduce per group, where it was summed: no copy of every F x F at once, and
                # none at all of the sums this reduce consumes (summed in place)
                if consume:
                    second, local[g.key].xtx = comm.all_reduce_sum_(local[g.key].xtx).div_(count), None
                else:
                    second = comm.all_reduce_sum(local[g.key].xtx).div_(count)
            out[g.key] = UnitStats(count, mean, var, second)
        return out


def chunks(items: list, size: int) -> List[list]:
    """``items`` in runs of ``size`` (``0``: one run of all; none when ``items`` is empty)."""
    size = size or max(1, len(items))
    return [items[i:i + size] for i in range(0, len(items), size)]


def unit_std(group, stats: UnitStats) -> torch.Tensor:
    """float64[n_units]: each unit's activation standard deviation.

    A unit with several input features (an attention head, or a key/value group under GQA) gets
    the square root of the *mean* of its features' variances: the RMS deviation per feature,
    which for one feature (an MLP neuron) is its plain std and does not grow with head_dim.
    Replacing the unit by its mean costs ``sum of variances`` in squared error,
    i.e. ``n_features * unit_std**2``; within one structure type every unit has the same number
    of features, so ranking by either is the same.
    """
    ids = group.feature_units
    valid = ids >= 0
    total = torch.zeros(group.n_units, dtype=torch.float64)
    total.index_add_(0, ids[valid], stats.var[valid].to(torch.float64))
    n = torch.zeros(group.n_units, dtype=torch.float64)
    n.index_add_(0, ids[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    return (total / n.clamp(min=1)).sqrt()


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recompute)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, collections.abc.Mapping):  # a dict, or a tokenizer's BatchEncoding
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


@functools.cache
def _forward_signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bound_argument(module, args, kwargs, name: str):
    """The value ``module``'s forward receives as ``name`` from this call, or None."""
    try:
        return _forward_signature(type(module)).bind_partial(module, *args, **kwargs).arguments.get(name)
    except TypeError:  # arguments the signature does not take: the forward's own error follows
        return None


def _forward(model, batch, device, index: int) -> None:
    """The model's forward on calibration batch ``index``; its error says which batch it was."""
    if not isinstance(batch, dict) and not torch.is_tensor(batch):  # a DataLoader's (ids, mask) tuple, say
        raise ValueError(f"ds_bitter7: calibration batch {index} is a {type(batch).__name__}: {BATCH_FORM}")
    batch = _to(batch, device)
    try:
        if isinstance(batch, dict):
            model(**batch)
        else:
            model(batch)
    except Exception as err:
        shapes = ({k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)} if isinstance(batch, dict)
                  else tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__)
        note = f"ds_bitter7: in the model's forward on calibration batch {index} (shapes {shapes})"
        if hasattr(err, "add_note"):  # Python 3.11+: printed with the traceback
            err.add_note(note)
        else:
            logger.error(note)
        raise


def _progress(batches: list):
    if not is_main_process():
        return batches
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional for the library
        return batches
    return tqdm(batches, desc="bitter7 calibration", leave=False)
