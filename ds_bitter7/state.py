"""Pruner state in DeepSpeed checkpoints.

``attach`` wraps the engine's ``save_checkpoint``/``load_checkpoint``:
- the replicated state (per-unit masks, schedule position, event log) goes into ``client_state``
  under ``"bitter7"``, which DeepSpeed writes from data-parallel rank 0 and every rank reads back;
- per-rank state (movement accumulators and unstructured masks, both over this rank's fragments;
  with ``source: training``, the activation sums of the window so far) goes into
  ``bitter7_rank{r}.pt`` beside DeepSpeed's files, written atomically. Resuming at another world
  size (universal checkpoint) cannot reuse it: movement accumulators and the window restart and
  unstructured masks are re-derived from the exactly-zero weights, with a warning.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from typing import Any, BinaryIO, Callable, Optional

import torch

from .comm import log_main

logger = logging.getLogger(__name__)

CLIENT_KEY = "bitter7"
TRAINER_FILE = "bitter7_state.pt"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's, in every tag folder


class CheckpointError(ValueError):
    """A pruner state that is missing, unreadable or for another model."""


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open``/``mkdir`` would give, for files made with
    ``tempfile`` (which makes them private to the owner). Read from /proc where it can be, so the
    umask is never changed, not even for a moment, under other threads."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` to ``path`` through a temporary file in the same folder, then rename (the file
    gets the umask's usual permissions, like DeepSpeed's own checkpoint files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path``, atomically (``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_torch_file(path: str, error: type = CheckpointError, what: str = "") -> Any:
    """torch.load (memory-mapped, on the CPU: tensors are read as they are copied), with ``error``
    naming ``what`` and the file when it is empty, truncated or not a torch file."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:  # torch's own word is about mmap and zipfiles
        raise error(f"cannot read {what}{path!r}: the file is empty (an interrupted copy?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise error(f"cannot read {what}{path!r}: {type(err).__name__}: {err}") from err


def load_file(path: str) -> dict:
    """torch.load a pruner state file, with an error naming the file when it is bad."""
    if not os.path.isfile(path):
        raise CheckpointError(f"bitter7 pruner state file {path} does not exist")
    state = read_torch_file(path, what="bitter7 pruner state file ")
    if not isinstance(state, dict):
        raise CheckpointError(f"bitter7 pruner state file {path} does not hold a pruner state")
    return state


def _rank_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"bitter7_rank{rank}.pt")


def latest_tag(folder: str, universal: bool = False) -> Optional[str]:
    """The tag DeepSpeed's ``latest`` (``latest_universal``) file in ``folder`` names, or None
    without one."""
    latest = os.path.join(folder, "latest_universal" if universal else "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def _resolve_tag(load_dir: str, tag: Optional[str], universal: bool) -> Optional[str]:
    return tag if tag is not None else latest_tag(load_dir, universal)


def write_latest(save_dir: str, tag: str) -> None:
    """DeepSpeed's ``latest`` file naming ``tag``, replaced atomically."""
    atomic_write(os.path.join(save_dir, "latest"), lambda f: f.write(tag.encode()))


def checkpoint_tags(folder: str) -> list:
    """The checkpoint tags in ``folder``: its subfolders holding DeepSpeed's model-states file."""
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, MODEL_STATES_FILE)))


def save_model_config(model, save_dir: str, replace: bool = False) -> None:
    """The model's ``config.json`` (and generation config) beside its checkpoints, where the export
    and one-shot read it, unless one is there (a Trainer's ``checkpoint-N``) or with ``replace``.
    Best effort: a config transformers refuses to write (it validates them) is warned about; the
    checkpoint itself is complete without it."""
    config = getattr(model, "config", None)
    if not hasattr(config, "save_pretrained") or (not replace and os.path.exists(os.path.join(save_dir, "config.json"))):
        return
    for what, without in ((config, "the export and one-shot then need --model_config"),
                          (getattr(model, "generation_config", None), "an export gets transformers' defaults")):
        try:
            if what is not None:
                what.save_pretrained(save_dir)
        except Exception as err:  # noqa: BLE001 - transformers' validation: the checkpoint does not need it
            logger.warning("ds_bitter7: not writing the model's %s into %s (%s: %s): %s", type(what).__name__,
                           save_dir, type(err).__name__, err, without)


def install_checkpoint_hooks(engine, pruner) -> None:
    """Make ``engine.save_checkpoint``/``load_checkpoint`` carry the pruner's state; they take
    DeepSpeed's arguments, positional or by name.

    A save writes ``latest`` only once every rank's pruner file is written (DeepSpeed writes it
    before our rank files exist): a save that fails or is killed on the way leaves ``latest``
    naming the previous, complete checkpoint. Under a decoupled checkpoint engine, which commits
    ``latest`` itself later, DeepSpeed's order is kept.
    """
    save, load = engine.save_checkpoint, engine.load_checkpoint
    save_signature, load_signature = inspect.signature(save), inspect.signature(load)

    def save_checkpoint(*args, **kwargs):
        pruner.refuse_if_broken("save a checkpoint")  # half-refit weights under the old masks, which a load trusts
        call = save_signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        if given["tag"] is None:
            given["tag"] = f"global_step{engine.global_steps}"
        tag, save_dir, save_latest = str(given["tag"]), given["save_dir"], given["save_latest"]
        given["client_state"] = {**(given["client_state"] or {}), CLIENT_KEY: pruner.state_dict()}
        decoupled = bool(getattr(engine.checkpoint_engine, "is_decoupled", lambda: False)())
        if not decoupled:
            given["save_latest"] = False
        out = save(*call.args, **call.kwargs)
        rank_file = _rank_file(os.path.join(save_dir, tag), pruner.comm.rank)
        pruner.comm.call(f"writing {rank_file}", lambda: atomic_save(pruner.local_state_dict(), rank_file))
        rank0 = engine.global_rank == 0
        if rank0:  # best effort, never raises: no collective needed
            save_model_config(engine.module, save_dir)
        if save_latest and not decoupled:
            pruner.comm.call(f"writing {save_dir}/latest", lambda: write_latest(save_dir, tag) if rank0 else None)
        return out

    def load_checkpoint(*args, **kwargs):
        call = load_signature.bind(*args, **kwargs)
        call.apply_defaults()
        load_dir, tag = call.arguments["load_dir"], call.arguments["tag"]
        universal = bool(engine.load_universal_checkpoint())
        resolved = _resolve_tag(load_dir, tag, universal)
        missing = resolved is not None and not os.path.isdir(os.path.join(load_dir, str(resolved)))
        pruner.comm.raise_if_any(CheckpointError(f"checkpoint tag folder {os.path.join(load_dir, str(resolved))} "
                                                 f"does not exist (tags in {load_dir}: {checkpoint_tags(load_dir)})")
                                 if missing else None, "finding the checkpoint", CheckpointError)
        path, client_state = load(*call.args, **call.kwargs)
        if path is None:
            return path, client_state
        state = (client_state or {}).pop(CLIENT_KEY, None)
        if state is None:
            raise CheckpointError(f"checkpoint {path} has no bitter7 pruner state (client_state key "
                                  f"'{CLIENT_KEY}'): it was not saved by a ds_bitter7 engine; refusing to "
                                  "restart the pruning schedule silently (to prune a dense checkpoint in one "
                                  "event use python -m ds_bitter7.oneshot; to prune it gradually, start a "
                                  "new run from its weights)")
        pruner.load_state_dict(state, source=path)
        restore_local(pruner, os.path.join(load_dir, str(resolved)), state, universal)
        return path, client_state

    save_checkpoint.__signature__, load_checkpoint.__signature__ = save_signature, load_signature  # as inspect sees them
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def restore_local(pruner, folder: str, state: dict, universal: bool = False) -> None:
    """Restore this rank's state (movement, unstructured masks) from ``folder`` (a tag folder).

    Collective: a missing or bad file on any rank fails every rank.
    """
    error, local = None, None
    try:
        local = _load_local(folder, pruner, state, universal)
        if local is not None:  # checked before the collectives of load_local_state_dict
            pruner.check_local_state(local, _rank_file(folder, pruner.comm.rank))
    except CheckpointError as e:
        error = e
    pruner.comm.raise_if_any(error, "loading the bitter7 per-rank state")
    pruner.load_local_state_dict(local)


def _load_local(folder: str, pruner, state: dict, universal: bool = False) -> Optional[dict]:
    """This rank's state file, or None (with a warning) where the world size changed or the
    checkpoint is a universal one (``ds_to_universal`` does not carry the rank files)."""
    saved_world = state.get("world_size")
    if universal or (saved_world is not None and saved_world != pruner.comm.world_size):
        why = "a universal checkpoint" if universal else f"world size {pruner.comm.world_size} from {saved_world}"
        log_main("bitter7: resuming through %s: movement accumulators and the training window (source "
                 "'training') restart, unstructured masks are re-derived from zero weights", why,
                 level=logging.WARNING, log=logger)
        return None
    path = _rank_file(folder, pruner.comm.rank)
    return load_file(path)
