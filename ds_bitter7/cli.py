"""Argument checks shared by the launch scripts (``launch/train.py``, ``launch/train_hf_trainer.py``):
made before any work, so a bad value fails in a second, not after a model load or a training run.
Values are checked before the ranks start; paths, once they have (a node's disk may differ)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

from .comm import Communicator, rank_list, ranks_not_sharing
from .config import Bitter7Config, check_deepspeed_support, load_ds_config, optimizer_problems, parse_config
from .export import TOKENIZER_FILES, is_within, unwritable
from .modeling import parse_overrides
from .state import MODEL_STATES_FILE

logger = logging.getLogger(__name__)

# what a run writes directly into its checkpoint folder besides the tag folders (DeepSpeed's
# ``latest`` files and script, launch/train.py's model config and tokenizer)
CHECKPOINT_FILES = ("latest", "latest_universal", "zero_to_fp32.py", "zero_to_torch.py", "config.json",
                    *TOKENIZER_FILES)


def check_launch_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      minimums: Sequence[Tuple[str, int]]) -> None:
    """``parser.error`` (exit 2, usage shown) for an argument below its minimum (``(name, least)``)
    or a ``--model_overrides`` that is no JSON object (else parsed in place). These read no file, so
    every node finds the same: checked before any rank starts (the paths: ``path_problems``)."""
    for key, least in minimums:
        if getattr(args, key) < least:
            parser.error(f"--{key} must be >= {least}, got {getattr(args, key)}")
    try:
        args.model_overrides = parse_overrides(args.model_overrides)
    except ValueError as err:
        parser.error(str(err))


def path_problems(rank: int, summary: Optional[str], reads: Sequence[Optional[str]] = (),
                  output_dirs: Sequence[Tuple[str, Optional[str]]] = (),
                  checkpoints: Sequence[Optional[str]] = (), data: Sequence[str] = ()) -> List[str]:
    """Why this rank cannot write the run's outputs: an output folder (``(flag, path)``, written by
    every rank) that cannot be made or written, or that is a ``data`` folder (the run's JSON files
    would be read as data at the next start), or, on rank 0 (only it writes the summary, so
    another node need not see the path), a ``--summary`` that is a folder, cannot be made, or would
    replace a file the run reads (``reads``: inputs, files or folders) or one of its checkpoints'
    (``checkpoints``: folders). Found before any work: else at the first save, after training.
    A node's disk may differ from the others': pass them to ``exit_on_path_problems``."""
    problems = [problem for flag, path in output_dirs if path
                for problem in (folder_problem(path, flag),) if problem]
    problems += [f"{flag} {path!r} is a --data folder: the files the run writes there (config.json, ...) would "
                 "be read as data when it resumes; choose another folder" for flag, path in output_dirs if path
                 for folder in data if os.path.isdir(folder) and os.path.realpath(folder) == os.path.realpath(path)]
    if summary and rank == 0:
        problems += [p for p in (summary_problem(summary, reads, checkpoints),) if p]
    return problems


def exit_on_path_problems(check: Callable[[], List[str]], checkpoints: Optional[Tuple[str, str]]) -> None:
    """The run's paths, checked on every rank once the ranks have started (a node's disk may differ):
    ``check()``'s problems (``path_problems``; an ``OSError`` it raises, such as a folder this rank
    cannot list, is one too) stop every rank; then ``checkpoints`` (``(flag, folder)``, None for
    none), written by every rank, must be one folder all ranks see (``unshared_problem``).

    Collective: every rank must call this, in the same order.
    """
    try:
        problems = check()
    except OSError as err:
        problems = [f"cannot check the arguments' paths: {err}"]
    exit_on_every_rank(*problems, elsewhere="another rank refuses the arguments' paths")
    unshared = unshared_problem(checkpoints[1], checkpoints[0]) if checkpoints else None
    if unshared:  # found alike on every rank
        raise SystemExit(unshared)


def read_ds_config(path: str, where: str, trainer: bool = False) -> Tuple[dict, Bitter7Config]:
    """The DeepSpeed config at ``path`` and its parsed ``bitter7`` section, the DeepSpeed settings
    the pruner cannot serve refused (and ``"auto"`` values, which only the HF Trainer fills in,
    unless ``trainer``): a problem (``where``: the script and its option) stops every rank before a
    model or data is built. Collective: every rank must call this, in the same order."""
    ds_config, cfg, problem = None, None, None
    try:
        ds_config = load_ds_config(path)
        cfg = parse_config(ds_config)
        if cfg.enabled:
            check_deepspeed_support(ds_config)
        problems = optimizer_problems(ds_config)
        if problems:
            raise ValueError("\n".join(["DeepSpeed config cannot be used:", *problems]))
        auto = auto_keys(ds_config)
        if auto and not trainer:
            raise ValueError(f"{', '.join(auto)} = \"auto\": only the HF Trainer (launch/train_hf_trainer.py) "
                             "fills \"auto\" in; give numbers")
    except ValueError as err:
        problem = f"{where} {path}: {err}"
    exit_on_every_rank(problem, elsewhere=f"another rank cannot read {where} {path}")
    return ds_config, cfg


def auto_keys(config: dict) -> List[str]:
    """The dotted keys whose ``"auto"`` DeepSpeed would read as a value: top-level ones (batch
    sizes, ``gradient_clipping``), the optimizer's and scheduler's, and ``fp16`` / ``bf16``
    ``enabled``. Its config sections (``zero_optimization``, ``data_types``, ...) take ``"auto"``
    as their default, so theirs are left alone."""
    def nested(obj, prefix: str) -> List[str]:
        if obj == "auto":
            return [prefix]
        return [k for key, value in obj.items() for k in nested(value, f"{prefix}.{key}")] if isinstance(obj, dict) else []

    keys = [str(key) for key, value in config.items() if value == "auto"]
    keys += nested(config.get("optimizer"), "optimizer") + nested(config.get("scheduler"), "scheduler")
    keys += [f"{kind}.enabled" for kind in ("fp16", "bf16", "bfloat16")
             if isinstance(config.get(kind), dict) and config[kind].get("enabled") == "auto"]
    return keys


def build_or_exit(what: str, fn: Callable, *args):
    """``Communicator().call(what, fn, *args)`` for what a launch script builds from the user's
    arguments (tokenizer, data, model): a bad path or name (``ValueError``, ``OSError``) stops every
    rank with one line, the error of the rank that found it (the others: that another rank
    failed), not a traceback per rank; other errors keep theirs. Collective: every rank must call
    this, in the same order."""
    try:
        return Communicator().call(what, fn, *args)
    except Exception as err:
        if getattr(err, "another_rank", False):  # that rank says what it was
            raise SystemExit(str(err)) from None
        if not isinstance(err, (ValueError, OSError)):  # a bug, not a bad argument: its traceback
            raise
        logger.debug("%s failed", what, exc_info=True)
        raise SystemExit(f"{what}: {type(err).__name__}: {err}") from None


def exit_on_every_rank(*problems: Optional[str], elsewhere: str) -> None:
    """``SystemExit`` on every rank when any rank has a problem (``None``: none): its own, one
    per line, or ``elsewhere`` (what another rank refused) on the others. A node whose files
    differ must not leave the others waiting. Collective: every rank calls it, in the same order."""
    mine = [p for p in problems if p]
    if Communicator().any(bool(mine)):
        raise SystemExit("\n".join(mine) if mine else f"{elsewhere} (see that rank's error)")


def unshared_problem(path: str, flag: str) -> Optional[str]:
    """Why ``path``, a checkpoint folder every rank writes in, is not one folder for all ranks (a
    folder local to each node), else None. Rank 0 makes it where missing.

    Collective: every rank must call this, in the same order; every rank gets the same answer.
    """
    ranks = ranks_not_sharing(path, Communicator())
    if not ranks:
        return None
    return (f"{flag} {path!r} is not on a file system every node sees: rank(s) {rank_list(ranks)} do not "
            "see a file rank 0 wrote there. Each rank writes its own ZeRO files into it and rank 0 the rest, so "
            "no node would hold a whole checkpoint: put it on a file system shared by all nodes")


def folder_problem(path: str, flag: str) -> Optional[str]:
    """Why ``path`` cannot be a folder this process writes in: a file, an existing folder it may
    not write in, or (not there yet) one whose nearest existing ancestor is either; else None."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{flag} {path!r} is a file, not a folder"
    if os.path.isdir(path):
        return None if os.access(path, os.W_OK | os.X_OK) else f"{flag} {path!r}: no permission to write in it"
    return make_problem(path, flag)


def make_problem(path: str, flag: str) -> Optional[str]:
    """Why ``path`` (a file or folder to be made, with any missing parents) cannot be (see
    ``export.unwritable``), in ``flag``'s name; else None."""
    problem = unwritable(path)
    return f"{flag} {path!r}: {problem}" if problem else None


def summary_problem(summary: str, reads: Sequence[Optional[str]], checkpoints: Sequence[Optional[str]]) -> Optional[str]:
    """Why ``--summary`` cannot be written (see ``path_problems``), or None."""
    name = f"--summary {summary!r}"
    problem = file_problem(summary, name, reads)
    if problem:
        return problem
    for folder in checkpoints:
        if folder and is_within(summary, folder) and _checkpoint_file(folder, summary):
            return f"{name} would replace a file of the checkpoints in {folder!r}: name another file"
    if os.path.isfile(summary) and not os.access(summary, os.W_OK):
        return f"{name}: no permission to replace it"
    return make_problem(summary, "--summary")


def file_problem(path: str, name: str, reads: Sequence[Optional[str]]) -> Optional[str]:
    """Why ``path`` (an output file, ``name`` in messages) must not be written: it is a folder, or
    it is or lies inside one of ``reads`` (inputs, files or folders); else None."""
    if os.path.isdir(path):
        return f"{name} is a folder: name a file"
    read = [p for p in reads if p and os.path.exists(p) and is_within(path, p)]
    if read:
        return f"{name} is or is inside {read[0]!r}, which this run reads: name another file"
    return None


def _checkpoint_file(folder: str, path: str) -> bool:
    """Whether ``path`` (inside ``folder``) is a checkpoint's: ``latest``, ``config.json``, ... or
    anything in a tag folder (DeepSpeed's ``global_stepN``, the Trainer's ``checkpoint-N``)."""
    parts = os.path.relpath(os.path.realpath(path), os.path.realpath(folder)).split(os.sep)
    if len(parts) == 1:
        return parts[0] in CHECKPOINT_FILES
    return parts[0].startswith(("global_step", "checkpoint-")) or os.path.isfile(
        os.path.join(folder, parts[0], MODEL_STATES_FILE))
