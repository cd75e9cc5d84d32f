"""One-shot's checkpoint side: what a DeepSpeed checkpoint folder holds (read from its files, no
collective), and loading it WITH its optimizer state into a DeepSpeed engine: at its own world
size directly (ZeRO 0/1/2), at another through DeepSpeed's universal checkpoint conversion (ZeRO
1/2), with the optimizer's parameter groups and frozen parameters as the training run had them.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .checkpoint_files import (
    ExportError,
    consolidate,
    read_torch_file,
    resolve_tag,
    strip_module_prefix,
    zero3_problem,
    zero_file_problems,
)
from .comm import mark_every_rank, rank_list, ranks_not_sharing
from .state import MODEL_STATES_FILE as MODEL_STATES

logger = logging.getLogger(__name__)

# Keys of the training config that shape how the checkpoint loads; everything else is dropped.
KEEP_DS_KEYS = ("optimizer", "zero_optimization", "bf16", "fp16", "data_types", "gradient_clipping")
UNIVERSAL_MARK = ".ds_bitter7_universal_tmp"  # in the conversion folder: only such a folder is ever deleted


class OneShotError(ValueError):
    """A bad argument or checkpoint, raised identically on every rank before any collective."""


@dataclass
class CheckpointInfo:
    """What a DeepSpeed checkpoint folder holds, read from its files (no collective)."""

    tag: str
    folder: str  # CHECKPOINT_DIR/TAG
    zero_files: List[str]  # *optim_states.pt, one per data-parallel rank (ZeRO 1/2, BF16_Optimizer)
    has_optimizer_state: bool
    ds_config: Dict[str, Any]  # the config saved with the checkpoint (may be empty)
    module_shapes: Dict[str, Tuple[int, ...]]  # the saved model's tensors ("module." prefix removed)
    client_bitter7: Optional[dict]  # pruner state of a ds_bitter7 checkpoint
    seq_len: Optional[int] = None  # block length of the training run (launch/train.py records it)
    tokenizer: Optional[str] = None  # the training run's tokenizer, "bytes" or a path (launch/train.py records it)
    param_groups: Optional[List[List[str]]] = None  # parameter names of each optimizer group, in order
    step: Optional[int] = None  # the training step it was saved at (DeepSpeed's global_steps)


def inspect_checkpoint(checkpoint_dir: str, tag: Optional[str]) -> CheckpointInfo:
    """Read what the checkpoint holds; raises ``OneShotError`` naming the file at fault."""
    try:
        tag = resolve_tag(checkpoint_dir, tag)
    except ExportError as err:
        raise OneShotError(str(err)) from None
    folder = os.path.join(checkpoint_dir, tag)
    states = os.path.join(folder, MODEL_STATES)
    if not os.path.isfile(states):
        raise OneShotError(zero3_problem(folder) or f"{states!r} does not exist: not a DeepSpeed checkpoint folder")
    try:
        sd = read_torch_file(states)
    except ExportError as err:
        raise OneShotError(str(err)) from None
    zero_files = sorted(glob.glob(os.path.join(folder, "*optim_states.pt")))
    world = sd.get("dp_world_size") if isinstance(sd, dict) else None
    problems = zero_file_problems(folder, world if isinstance(world, int) else None)
    if problems:  # before DeepSpeed's loading: a rank failing inside it leaves the others waiting
        raise OneShotError("; ".join(problems))
    has_state = bool(zero_files) or _has_torch_state(sd.get("optimizer"))
    module = strip_module_prefix(sd.get("module") or {})
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in module.items()}
    saved = sd.get("ds_config")
    seq_len = sd.get("seq_len")
    groups = sd.get("param_shapes")
    groups = ([list(strip_module_prefix(dict(g))) for g in groups]
              if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None)
    tokenizer = sd.get("tokenizer")
    return CheckpointInfo(tag, folder, zero_files, has_state, saved if isinstance(saved, dict) else {},
                          shapes, sd.get("bitter7"), seq_len if isinstance(seq_len, int) else None,
                          tokenizer if isinstance(tokenizer, str) else None, groups,
                          sd.get("global_steps") if isinstance(sd.get("global_steps"), int) else None)


def _has_torch_state(opt) -> bool:
    return isinstance(opt, dict) and bool(opt.get("state"))


def ds_config_stage_problems(path: str, given: dict, info: CheckpointInfo) -> List[str]:
    """Why DeepSpeed could not load ``info``'s checkpoint with the ZeRO stage of ``--ds_config``
    (it would fail inside its loading with a bare AttributeError or AssertionError)."""
    zero = given.get("zero_optimization")
    if not isinstance(zero, dict):  # loading_config gives it the checkpoint's own stage
        return []
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        return [f"--ds_config {path!r}: ZeRO stage {stage!r}: ds_bitter7 works with ZeRO stage 0, 1 and 2"]
    if info.zero_files and stage == 0:
        return [f"--ds_config {path!r} has ZeRO stage 0, but checkpoint {info.folder!r} keeps its optimizer "
                "state in ZeRO files (*optim_states.pt): load it with stage 1 or 2"]
    if not info.zero_files and info.has_optimizer_state and stage != 0:
        return [f"--ds_config {path!r} has ZeRO stage {stage}, but checkpoint {info.folder!r} was saved at "
                f"stage 0 (its optimizer state is in {MODEL_STATES}): load it with stage 0"]
    return []


def universal_dir(output_dir: str) -> str:
    """Where a checkpoint of another world size is converted (deleted after loading)."""
    return os.path.abspath(output_dir) + ".universal_tmp"


def loading_config(args: argparse.Namespace, info: CheckpointInfo, given: Optional[dict] = None) -> dict:
    """The DeepSpeed config to load with: the saved one, or ``--ds_config``'s (``given``: already
    read), reduced to what loading needs."""
    if given is not None:
        base = given
    elif args.ds_config:
        from .config import load_ds_config

        base = load_ds_config(args.ds_config)
    else:
        base = info.ds_config
    cfg = {k: base[k] for k in KEEP_DS_KEYS if k in base}
    if isinstance(cfg.get("zero_optimization"), dict):  # no step is taken: offload only gets in the way
        cfg["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items()
                                    if k not in ("offload_optimizer", "offload_param")}
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}}
    if "zero_optimization" not in cfg:
        cfg["zero_optimization"] = {"stage": 1 if info.zero_files else 0}
    cfg.update({"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                "steps_per_print": 10**9})
    return cfg


def check_model_matches(model, info: CheckpointInfo, config_dir: str) -> None:
    """Raise ``OneShotError`` when the model built from ``config.json`` does not fit the checkpoint."""
    wrong = []
    for name, param in model.named_parameters():
        saved = info.module_shapes.get(name)
        if saved != tuple(param.shape):
            wrong.append(f"{name}: {'missing' if saved is None else list(saved)} in the checkpoint, "
                         f"{list(param.shape)} in the model")
    known = set(model.state_dict())  # tied weights (lm_head) are saved under both names
    wrong += [f"{name}: {list(shape)} in the checkpoint, missing in the model"
              for name, shape in info.module_shapes.items() if name not in known]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise OneShotError(f"the model of {os.path.join(config_dir, 'config.json')!r} does not match checkpoint "
                           f"{info.folder!r}: {'; '.join(wrong[:3])}{more}; pass the training run's config with "
                           "--model_config")


def fit_checkpoint_biases(model, info: CheckpointInfo) -> None:
    """Give out projections without a bias (LLaMA) the compensation biases a ds_bitter7 checkpoint
    carries, so that it loads."""
    from .export import add_missing_biases_

    add_missing_biases_(model, {k: torch.zeros(s) for k, s in info.module_shapes.items() if k.endswith(".bias")})


def frozen_in_training(names: Iterable[str], info: CheckpointInfo) -> List[str]:
    """Those of ``names`` in no optimizer group of the checkpoint: frozen in training (none where
    the checkpoint names no groups)."""
    if not info.param_groups:
        return []
    listed = {n for group in info.param_groups for n in group}
    return [n for n in names if n not in listed]


def saved_param_groups(model, info: CheckpointInfo):
    """The model's parameters grouped as the checkpoint's optimizer had them (a ZeRO partition is
    laid out per group: weight-decay / no-decay groups must be rebuilt to load it). A parameter in
    no group was frozen in training: it is frozen here too, and takes its saved weights (DeepSpeed's
    universal loading restores only the optimizer's parameters)."""
    named = dict(model.named_parameters())
    if not info.param_groups:
        return [p for p in named.values() if p.requires_grad]
    frozen = frozen_in_training(named, info)
    if frozen:
        module = strip_module_prefix(read_torch_file(os.path.join(info.folder, MODEL_STATES))["module"])
        with torch.no_grad():
            for n in frozen:
                named[n].requires_grad_(False)
                named[n].copy_(module[n])
    return [{"params": [named[n] for n in names if n in named]} for names in info.param_groups]


def to_universal(info: CheckpointInfo, work_dir: str, comm) -> str:
    """Convert a ZeRO-1/2 checkpoint to DeepSpeed's universal format (rank 0); returns the folder
    to load from with ``load_universal``. Collective: every rank must call this."""
    out = os.path.join(work_dir, info.tag)

    def make_work_dir() -> None:
        shutil.rmtree(work_dir, ignore_errors=True)  # an earlier run's (output_dir_problem checked the mark)
        os.makedirs(work_dir)
        with open(os.path.join(work_dir, UNIVERSAL_MARK), "w") as f:
            f.write("a universal checkpoint made by ds_bitter7.oneshot; deleted after loading\n")

    comm.call(f"making {work_dir!r}", make_work_dir if comm.rank == 0 else lambda: None)
    unseen = ranks_not_sharing(work_dir, comm)
    if unseen:  # found alike on every rank, before the conversion: else the others failed to load it
        if comm.rank == 0:
            shutil.rmtree(work_dir, ignore_errors=True)
        error = OneShotError(f"rank 0 converts the checkpoint for {comm.world_size} ranks into {work_dir!r}, which "
                             f"rank(s) {rank_list(unseen)} do not see: put OUTPUT_DIR on a file system every node sees")
        mark_every_rank(error)
        raise error
    error = None
    if comm.rank == 0:
        try:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", info.folder,
                   "--output_folder", out, "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise OneShotError(f"universal checkpoint conversion failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
            with open(os.path.join(work_dir, "latest_universal"), "w") as f:
                f.write(info.tag)
        except Exception as err:  # reported on every rank below
            error = err
            shutil.rmtree(work_dir, ignore_errors=True)  # a partial fp32 copy of the whole model
    comm.raise_if_any(error, "universal checkpoint conversion")
    return work_dir


def build_engine(args, info: CheckpointInfo, model, comm):
    """A DeepSpeed engine holding the checkpoint's weights and (when it has it) optimizer state."""
    import deepspeed

    cfg = loading_config(args, info)
    world = comm.world_size
    universal = info.zero_files and len(info.zero_files) != world and \
        int(cfg["zero_optimization"].get("stage", 0)) in (1, 2)
    load_dir, tag = args.checkpoint_dir, info.tag
    if universal:
        load_dir = to_universal(info, universal_dir(args.output_dir), comm)
        cfg["checkpoint"] = {"load_universal": True}
    try:
        if not info.has_optimizer_state:  # magnitude only: the module weights are all it needs
            model.load_state_dict(consolidate(args.checkpoint_dir, info.tag), strict=True)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=saved_param_groups(model, info),
                                          config=cfg)
        if info.has_optimizer_state:
            error = path = None
            try:
                path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
            except Exception as err:  # noqa: BLE001 - a file whose archive is whole but whose contents are not
                error = OneShotError(f"DeepSpeed could not load {info.folder!r} on rank {comm.rank} "
                                     f"({type(err).__name__}: {err}): a corrupt file, or a --ds_config or "
                                     "model that differs from the training run's?")
            comm.raise_if_any(error, f"loading {info.folder!r}", OneShotError)  # the others wait here, not in gloo
            if path is None:
                raise OneShotError(f"DeepSpeed could not load {info.folder!r}")
        if universal:
            comm.any(False)  # every rank has read the converted files before rank 0 removes them
    finally:  # the converted copy (a full fp32 checkpoint) never outlives the run, even a failed one
        if universal and comm.rank == 0:
            shutil.rmtree(load_dir, ignore_errors=True)
    return engine
