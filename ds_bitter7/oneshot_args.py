"""The arguments of ``python -m ds_bitter7.oneshot`` and every check made before any work: flags,
data paths, the checkpoint and its model config, the output and report locations. The checks are
local (the same answer on every rank) and name every problem at once, in one ``OneShotError``.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, List, Optional, Sequence, Tuple

from . import data as dsdata
from .checkpoint_files import ExportError, precision_problem, tag_folder_hint
from .checkpoint_loading import (
    UNIVERSAL_MARK,
    CheckpointInfo,
    OneShotError,
    ds_config_stage_problems,
    inspect_checkpoint,
    loading_config,
    universal_dir,
)
from .cli import file_problem, make_problem
from .config import bf16_enabled, enum_name
from .export import is_within
from .modeling import max_positions, seq_len_problem
from .scores import get_scorer
from .shrink import window_export_problem
from .state import MODEL_STATES_FILE as MODEL_STATES
from .structures import adapter_for

# movement needs training steps
SCORES = ("bitter7", "magnitude", "fisher", "bitter7_variance", "fluctuation", "obs", "bitter7_obs")
NEEDS_OPTIMIZER = {s for s in SCORES if "exp_avg_sq" in get_scorer(s).needs}  # read Adam's exp_avg_sq
DEFAULT_SEQ_LEN = 256


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_bitter7.oneshot", description=(
        "One-shot pruning of a trained DeepSpeed checkpoint: score, calibrate, prune once, compensate, export."))
    p.add_argument("checkpoint_dir", help="folder given to engine.save_checkpoint (holds 'latest')")
    p.add_argument("output_dir", help="where to write the smaller Hugging Face model")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of units of each type removed, [0, 1)")
    p.add_argument("--structures", nargs="+", default=["mlp_neuron"], choices=["mlp_neuron", "attention_head"])
    p.add_argument("--score", default="bitter7_obs", choices=SCORES,
                   help="unit score (default: bitter7_obs, the greedy least-squares reconstruction order with "
                   "each output weighted by Adam's exp_avg_sq, which with least squares is the best one-shot "
                   "cell in benchmarks/results/oneshot*.md; bitter7, fisher and bitter7_variance read "
                   "exp_avg_sq too; without optimizer state use obs)")
    p.add_argument("--scope", default="global", choices=["global", "per_layer", "standardized"],
                   help="global threshold, same fraction per layer, or global over per-layer z-scores (FLAP; not with "
                   "the scores obs and bitter7_obs, the default: pass e.g. --score fluctuation)")
    p.add_argument("--compensation", default="least_squares", choices=["none", "mean", "least_squares"],
                   help="refit the next layers (default: least squares, the best one-shot column of "
                   "benchmarks/results/oneshot.md; mean compensation raised perplexity there)")
    p.add_argument("--ridge", type=float, default=1e-3, help="least-squares ridge, relative to mean variance")
    p.add_argument("--min_units_per_layer", type=int, default=1,
                   help="units every layer keeps under --scope global or standardized (default 1; 0 lets a layer lose all)")
    p.add_argument("--calibration", nargs="+", default=["builtin"],
                   help="builtin (its TRAIN split) | local .txt/.md/.rst/.text/.json/.jsonl files or folders")
    p.add_argument("--validation", nargs="+", default=None,
                   help="builtin (its validation split) | local files or folders; omit to skip perplexity")
    p.add_argument("--num_batches", type=int, default=8, help="calibration batches per rank")
    p.add_argument("--layers_per_pass", type=int, default=0,
                   help="sum the float64 F x F of at most this many layers per calibration pass (least squares, "
                   "obs, bitter7_obs): less memory, more forward passes, the same result (default 0: all at once)")
    p.add_argument("--eval_batches", type=int, default=32, help="validation batches per rank")
    p.add_argument("--batch_size", type=int, default=8,
                   help="sequences per batch: calibration, validation and DeepSpeed's micro-batch")
    p.add_argument("--seq_len", type=int, default=None,
                   help="tokens per block (default: the training run's, which launch/train.py records in the "
                   f"checkpoint, else {DEFAULT_SEQ_LEN} or the model's maximum positions if fewer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or name, or bytes (default: the tokenizer files beside "
                   "config.json if any, else bytes, as launch/train.py)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    p.add_argument("--model_config", default=None, help="folder with config.json (default: CHECKPOINT_DIR)")
    p.add_argument("--ds_config", default=None, help="DeepSpeed JSON to load with (default: the one saved "
                   "in the checkpoint, else fp32 AdamW at the checkpoint's ZeRO stage)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it is empty or a previous "
                   "export (holds pruning_report.json); nothing else is deleted")
    p.add_argument("--report", default=None, help="also write the one-shot summary JSON here (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def check_data_spec(spec: Optional[Sequence[str]], what: str) -> List[str]:
    """Problems with a DATA argument: 'builtin' or existing local files/folders."""
    if spec is None or list(spec) == [dsdata.BUILTIN]:
        return []
    missing = [s for s in spec if s == dsdata.BUILTIN or not os.path.exists(s)]
    if missing:
        return [f"--{what} {missing}: not found (give 'builtin' alone, or existing local "
                ".txt/.md/.json/.jsonl files or folders)"]
    try:
        dsdata.local_files(spec)
    except ValueError as err:  # a folder without data files
        return [f"--{what}: {err}"]
    return []


def check_args(args: argparse.Namespace, info: Optional[CheckpointInfo]) -> None:
    """Raise one ``OneShotError`` listing every problem (same on every rank: local checks only)."""
    pruner_numbers = pruner_number_problems(args)
    problems = list(pruner_numbers)
    problems += check_data_spec(args.calibration, "calibration") + check_data_spec(args.validation, "validation")
    if info is not None and not info.has_optimizer_state and args.score in NEEDS_OPTIMIZER:
        problems.append(f"checkpoint {info.folder!r} has no optimizer state (no *optim_states.pt and no "
                        f"'optimizer' in {MODEL_STATES}): score {args.score!r} needs Adam's exp_avg_sq; "
                        "--score obs, fluctuation or magnitude works without it")
    saved = (info.client_bitter7 or {}).get("structures") if info is not None else None
    trained = [k for k in saved or () if k != "unstructured"]
    if [k for k in trained if k not in args.structures]:
        problems.append(f"checkpoint {info.folder!r} was pruned in training with structures {saved}: those "
                        f"units stay pruned, so --structures must include {trained} "
                        f"(pass --structures {' '.join(dict.fromkeys(trained + list(args.structures)))})")
    if args.seq_len is not None and args.seq_len < 2:
        problems.append(f"--seq_len must be >= 2, got {args.seq_len}")
    problems += report_problems(args)
    if args.ds_config is not None:
        from .config import check_deepspeed_support, load_ds_config

        try:
            given = load_ds_config(args.ds_config)
        except Exception as err:  # noqa: BLE001 - unreadable file or invalid JSON: name it
            given = None
            problems.append(f"--ds_config {args.ds_config!r}: {type(err).__name__}: {err}")
        if given is not None and info is not None:
            stage_problems = ds_config_stage_problems(args.ds_config, given, info)
            problems += stage_problems
            try:  # what DeepSpeed will load with (offload dropped, the checkpoint's stage by default): fp16/bf16 at stage 0
                if not stage_problems:
                    check_deepspeed_support(loading_config(args, info, given))
            except ValueError as err:
                problems.append(f"--ds_config {args.ds_config!r}: {err}")
        if given is not None and info is not None:
            wants = bool(bf16_enabled(given))
            problems += [p for p in (precision_problem(info.zero_files, wants, f"--ds_config {args.ds_config!r}"),) if p]
    if args.batch_size < 1 or args.eval_batches < 0:
        problems.append("--batch_size must be >= 1, --eval_batches >= 0")
    if not pruner_numbers:  # the pruner config's own refusals (--scope standardized with an obs score), not twice
        from .config import parse_config

        try:
            parse_config({"bitter7": bitter7_section(args)})
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise OneShotError("; ".join(problems))


def unused_section(args: argparse.Namespace) -> Optional[str]:
    """What to say when ``--ds_config`` has a ``"bitter7"`` section: one-shot prunes as its flags
    say, and where the section says otherwise, which flags would follow it."""
    from .config import load_ds_config, parse_config

    section = load_ds_config(args.ds_config).get("bitter7") if args.ds_config else None
    if not isinstance(section, dict):
        return None
    said = f"--ds_config {args.ds_config!r}: its bitter7 section is not used (one-shot prunes as its flags say)"
    try:
        cfg = parse_config({"bitter7": section})
    except ValueError as err:
        return f"{said}; it is not valid either: {' '.join(str(err).split())}"
    trained = [enum_name(s) for s in cfg.structures if enum_name(s) != "unstructured"]  # one-shot prunes no elements
    flags = {"score": ("--score", enum_name(cfg.score), args.score),
             "structures": ("--structures", sorted(trained or args.structures), sorted(args.structures)),
             "scope": ("--scope", enum_name(cfg.scope), args.scope),
             "target_sparsity": ("--sparsity", cfg.target_sparsity, args.sparsity),
             "min_units_per_layer": ("--min_units_per_layer", cfg.min_units_per_layer, args.min_units_per_layer)}
    differ = [f"{flag} {' '.join(theirs) if isinstance(theirs, list) else theirs}"
              for key, (flag, theirs, mine) in flags.items() if key in section and theirs != mine]
    return said + (f"; to follow it, pass {' '.join(differ)}" if differ else "")


def pruner_number_problems(args: argparse.Namespace) -> List[str]:
    """Why the numbers ``bitter7_section`` passes to the pruner config are out of range, in the
    flags' own words (the config would name its keys)."""
    checks = ((0.0 <= args.sparsity < 1.0, f"--sparsity must be in [0, 1), got {args.sparsity}"),
              (args.min_units_per_layer >= 0, f"--min_units_per_layer must be >= 0, got {args.min_units_per_layer}"),
              (math.isfinite(args.ridge) and args.ridge >= 0, f"--ridge must be a finite number >= 0, got {args.ridge}"),
              (args.layers_per_pass >= 0, f"--layers_per_pass must be >= 0, got {args.layers_per_pass}"),
              (args.num_batches >= 1, f"--num_batches must be >= 1, got {args.num_batches}"))
    return [problem for ok, problem in checks if not ok]


def _inputs(args: argparse.Namespace, config_dir: Optional[str] = None) -> List[str]:
    """The paths a run reads (never to be written or deleted)."""
    paths = [args.checkpoint_dir, config_dir or args.model_config, args.tokenizer, args.ds_config,
             *(args.calibration or []), *(args.validation or [])]
    return [p for p in paths if p and p not in (dsdata.BUILTIN, dsdata.BYTES)]


def report_problems(args: argparse.Namespace) -> List[str]:
    """Why ``--report`` cannot be written: a folder, OUTPUT_DIR itself, an input or a file inside
    one, a missing folder, or (outside OUTPUT_DIR, which the export makes anew) an existing file
    without ``--overwrite``."""
    if args.report is None:
        return []
    report, out = os.path.abspath(args.report), os.path.abspath(args.output_dir)
    name = f"--report {args.report!r}"
    if report == out:
        return [f"{name} is a folder (OUTPUT_DIR): name a file"]
    problem = file_problem(report, name, _inputs(args))
    if problem:
        return [problem]
    if is_within(report, out):
        return []
    if not os.path.isdir(os.path.dirname(report)):
        return [f"{name}: folder {os.path.dirname(report)!r} does not exist"]
    if os.path.lexists(report) and not args.overwrite:
        return [f"{name} already exists (pass --overwrite to replace it)"]
    if os.path.lexists(report):  # written in place: its folder need not be writable
        return [] if os.access(report, os.W_OK) else [f"{name}: no permission to replace it"]
    return [p for p in (make_problem(report, "--report"),) if p]


def output_dir_problem(args: argparse.Namespace, config_dir: str) -> Optional[str]:
    """Why OUTPUT_DIR cannot be written (``export.check_output_dir``), or None."""
    from .export import check_output_dir

    try:
        check_output_dir(os.path.abspath(args.output_dir), args.overwrite, _inputs(args, config_dir))
    except ExportError as err:
        return str(err)
    work = universal_dir(args.output_dir)
    if os.path.lexists(work) and not os.path.isfile(os.path.join(work, UNIVERSAL_MARK)):
        return (f"{work!r} exists and was not made by ds_bitter7.oneshot, whose universal checkpoint "
                "conversion works there (and deletes it): move it away or choose another OUTPUT_DIR")
    return None


def resolve_seq_len(args: argparse.Namespace, info: CheckpointInfo, config) -> int:
    """``--seq_len``, else the training run's, else ``DEFAULT_SEQ_LEN`` capped at the model's positions.

    Blocks longer than the position table fail inside the model (GPT-2) or run on positions the
    model never trained on, whose activations would corrupt calibration: refused here instead.
    """
    limit = max_positions(config)
    seq_len = args.seq_len or info.seq_len or (min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN)
    problem = seq_len_problem(seq_len, config, f" (config.json of {args.model_config or args.checkpoint_dir!r})")
    if problem:
        raise OneShotError(problem)
    return seq_len


def bitter7_section(args: argparse.Namespace) -> dict:
    """The pruner config of a one-shot run (no schedule: one ``prune_to`` event)."""
    comp = args.compensation
    return {"enabled": True, "score": args.score, "structures": list(args.structures),
            "target_sparsity": args.sparsity, "scope": args.scope, "min_units_per_layer": args.min_units_per_layer,
            "schedule": {"start_step": 10**9, "end_step": 10**9},
            "bias_compensation": {"enabled": comp != "none", "source": "calibration",
                                  "mode": "mean" if comp == "none" else comp,
                                  "num_batches": args.num_batches, "ridge": args.ridge,
                                  "layers_per_pass": args.layers_per_pass}}


def check_inputs(args: argparse.Namespace) -> Tuple[CheckpointInfo, Any, str, Any]:
    """(checkpoint info, model config, its folder, pruner config), or one ``OneShotError`` naming every
    problem with the arguments, the checkpoint and the model config (local: the same on every rank)."""
    from .config import parse_config
    from .export import load_config, load_generation_config

    problems: List[str] = []

    def check(fn, *fn_args):
        try:
            return fn(*fn_args)
        except OneShotError as err:
            problems.append(str(err))

    info = check(inspect_checkpoint, args.checkpoint_dir, args.tag)
    check(check_args, args, info)  # the argument errors also when the checkpoint cannot be read
    config = None
    try:  # not for a checkpoint folder that does not exist, nor a tag folder: "no config.json" in it would add nothing
        if args.model_config or (os.path.isdir(args.checkpoint_dir) and not tag_folder_hint(args.checkpoint_dir)):
            config, config_dir = load_config(args.checkpoint_dir, args.model_config)
            load_generation_config(config_dir)  # the export carries it
    except ExportError as err:
        problems.append(str(err))
    if config is not None:
        try:  # before the data is read and the checkpoint loaded
            adapter_for(getattr(config, "model_type", None))
        except ValueError as err:
            problems.append(f"{config_dir}: {err}")
        unexportable = window_export_problem(config, args.structures, args.scope, args.compensation != "none")
        if unexportable:  # else found by the export, after the whole run
            fixes = [f for f, bad in (("--scope per_layer", args.scope != "per_layer"),
                                      ("--compensation none", args.compensation != "none")) if bad]
            problems.append(f"{config_dir}: {unexportable}: pass {' '.join(fixes)}")
        if info is not None:
            args.seq_len = check(resolve_seq_len, args, info, config)
    if problems:
        raise OneShotError("; ".join(problems))
    return info, config, config_dir, parse_config({"bitter7": bitter7_section(args)})
