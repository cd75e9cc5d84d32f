"""Argument checks shared by the launch scripts (``launch/train.py``, ``launch/train_hf_trainer.py``):
made before any work, so a bad value fails in a second, not after a model load or a training run."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence, Tuple

from .comm import launch_rank
from .export import TOKENIZER_FILES, is_within, nearest_existing
from .modeling import parse_overrides
from .state import MODEL_STATES_FILE

# what a run writes directly into its checkpoint folder besides the tag folders (DeepSpeed's
# ``latest`` files and script, launch/train.py's model config and tokenizer)
CHECKPOINT_FILES = ("latest", "latest_universal", "zero_to_fp32.py", "zero_to_torch.py", "config.json",
                    *TOKENIZER_FILES)


def check_launch_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      minimums: Sequence[Tuple[str, int]], reads: Sequence[Optional[str]] = (),
                      output_dirs: Sequence[Tuple[str, Optional[str]]] = (),
                      checkpoints: Sequence[Optional[str]] = ()) -> None:
    """``parser.error`` (exit 2, usage shown) for an argument below its minimum (``(name, least)``),
    a ``--model_overrides`` that is no JSON object (else parsed in place), an output folder
    (``(flag, path)``, written by every rank) that cannot be made or written, or, on the rank that
    writes it, a ``--summary`` that is a folder, cannot be made, or would replace a file the run
    reads (``reads``: inputs, files or folders) or one of its checkpoints' (``checkpoints``: folders)."""
    for key, least in minimums:
        if getattr(args, key) < least:
            parser.error(f"--{key} must be >= {least}, got {getattr(args, key)}")
    try:
        args.model_overrides = parse_overrides(args.model_overrides)
    except ValueError as err:
        parser.error(str(err))
    for flag, path in output_dirs:  # else found at the first save, after training
        problem = folder_problem(path, flag) if path else None
        if problem:
            parser.error(problem)
    if args.summary and launch_rank() == 0:  # only rank 0 writes it: another node need not see the path
        problem = summary_problem(args.summary, reads, checkpoints)
        if problem:
            parser.error(problem)


def folder_problem(path: str, flag: str) -> Optional[str]:
    """Why ``path`` cannot be a folder this process writes in: a file, an existing folder it may
    not write in, or (not there yet) one whose nearest existing ancestor is either; else None."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{flag} {path!r} is a file, not a folder"
    if os.path.isdir(path):
        return None if os.access(path, os.W_OK | os.X_OK) else f"{flag} {path!r}: no permission to write in it"
    return unwritable(path, flag)


def unwritable(path: str, flag: str) -> Optional[str]:
    """Why ``path`` (a file or folder to be made, with any missing parents) cannot be: its nearest
    existing ancestor is a file, or a folder this process may not write in; else None."""
    ancestor = nearest_existing(path)
    if not os.path.isdir(ancestor):
        return f"{flag} {path!r}: {ancestor!r} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{flag} {path!r}: no permission to write in {ancestor!r}"
    return None


def summary_problem(summary: str, reads: Sequence[Optional[str]], checkpoints: Sequence[Optional[str]]) -> Optional[str]:
    """Why ``--summary`` cannot be written (see ``check_launch_args``), or None."""
    name = f"--summary {summary!r}"
    if os.path.isdir(summary):
        return f"{name} is a folder: name a file"
    read = [p for p in reads if p and os.path.exists(p) and is_within(summary, p)]
    if read:
        return f"{name} is or is inside {read[0]!r}, which this run reads: name another file"
    for folder in checkpoints:
        if folder and is_within(summary, folder) and _checkpoint_file(folder, summary):
            return f"{name} would replace a file of the checkpoints in {folder!r}: name another file"
    if os.path.isfile(summary) and not os.access(summary, os.W_OK):
        return f"{name}: no permission to replace it"
    return unwritable(summary, "--summary")


def _checkpoint_file(folder: str, path: str) -> bool:
    """Whether ``path`` (inside ``folder``) is a checkpoint's: ``latest``, ``config.json``, ... or
    anything in a tag folder (DeepSpeed's ``global_stepN``, the Trainer's ``checkpoint-N``)."""
    parts = os.path.relpath(os.path.realpath(path), os.path.realpath(folder)).split(os.sep)
    if len(parts) == 1:
        return parts[0] in CHECKPOINT_FILES
    return parts[0].startswith(("global_step", "checkpoint-")) or os.path.isfile(
        os.path.join(folder, parts[0], MODEL_STATES_FILE))
