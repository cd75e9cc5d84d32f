"""Export a pruned DeepSpeed (or HF Trainer) checkpoint as a physically smaller Hugging Face model.

    python -m ds_bitter7.export CHECKPOINT_DIR OUTPUT_DIR [--tag TAG] [--model_config DIR]

CHECKPOINT_DIR is the folder given to `engine.save_checkpoint` (holding `latest` and the tag
folders) or a Trainer `checkpoint-N` folder. The fp32 weights are consolidated with DeepSpeed's own
`zero_to_fp32`; the masks come from the pruner state (client state key `"bitter7"`, or
`bitter7_state.pt` under Trainer). OUTPUT_DIR gets the model (safetensors + config),
`pruning_report.json` and `pruning_report.md`, written into a temporary folder and renamed.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import zipfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .shrink import key_mismatch, shrink_model, unit_counts, validate_masks, zero_pruned_units_
from .state import CLIENT_KEY as STATE_KEY
from .state import MODEL_STATES_FILE, umask_mode
from .state import TRAINER_FILE as TRAINER_STATE_FILE

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
SAVED_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")  # a Trainer's model weights
BF16_OPTIMIZER_PREFIX = "bf16_zero_pp_rank_"  # DeepSpeed's BF16_Optimizer's rank files
REPORT_FILE = "pruning_report.json"  # marks a folder as an export (``--overwrite`` replaces only those)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message names the file at fault."""


def resolve_tag(checkpoint_dir: str, tag: Optional[str] = None) -> str:
    """The checkpoint tag: `tag`, else the `latest` file, else the single `global_step*` folder."""
    if not os.path.isdir(checkpoint_dir):
        raise ExportError(f"checkpoint directory {checkpoint_dir!r} " + ("is a file: name the folder given to "
                          "save_checkpoint" if os.path.exists(checkpoint_dir) else "does not exist"))
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
            if not tag:
                raise ExportError(f"{latest!r} is empty (it should name a tag folder); pass --tag")
        else:
            steps = sorted(os.path.basename(p) for p in glob.glob(os.path.join(checkpoint_dir, "global_step*")))
            if len(steps) != 1:
                found = f"found tag folders {steps}" if steps else "no global_step* folder either"
                trainer = sorted((os.path.basename(p) for p in glob.glob(os.path.join(checkpoint_dir, "checkpoint-*"))),
                                 key=lambda name: (len(name), name))
                weights = [f for f in SAVED_MODEL_FILES if os.path.isfile(os.path.join(checkpoint_dir, f))]
                if trainer and not steps:
                    hint = f"a Trainer output_dir: pass one of its checkpoint folders ({', '.join(trainer[-3:])})"
                elif weights and not steps:  # a Trainer checkpoint saved with save_only_model=True
                    hint = (f"it holds model weights ({weights[0]}) but no {TRAINER_STATE_FILE} beside them: no pruner "
                            "masks to read (Bitter7Callback writes that file at each save; a run killed in between, "
                            "or one without the callback, leaves none)")
                else:
                    hint = "pass --tag"
                raise ExportError(f"no 'latest' file at {latest!r} ({found}); {hint}")
            tag = steps[0]
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise ExportError(f"checkpoint tag folder {os.path.join(checkpoint_dir, tag)!r} does not exist")
    return tag


def read_torch_file(path: str):
    """torch.load (memory-mapped, on the CPU), with an ``ExportError`` naming a bad file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ExportError(f"cannot read {path!r}: {type(err).__name__}: {err}") from err


def zero_file_problems(tag_dir: str, dp_world_size: Optional[int] = None) -> List[str]:
    """What is wrong with a tag folder's per-rank ZeRO files, read without loading them: a rank's
    ``*optim_states.pt`` missing (ranks 0..N-1, N the saved ``dp_world_size`` when known), or a
    file that is not a complete archive (truncated copy). Local: checked before any rank starts
    DeepSpeed's loading, whose collectives would wait forever on a rank that failed to read."""
    files = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    if not files:
        return []
    ranks = {}
    for path in files:
        name = os.path.basename(path)
        digits = name.split("rank_")[1].split("_")[0] if "rank_" in name else ""
        if digits.isdigit():
            ranks[int(digits)] = path
    expected = dp_world_size if dp_world_size else (max(ranks) + 1 if ranks else 0)
    problems = []
    missing = sorted(set(range(expected)) - set(ranks))
    if missing:
        problems.append(f"{tag_dir!r} holds {len(files)} *optim_states.pt but the checkpoint was saved by "
                        f"{expected} data-parallel ranks: rank(s) {missing} missing (an incomplete copy?)")
    extra = sorted(r for r in ranks if r >= expected)
    if extra:
        problems.append(f"{tag_dir!r} holds *optim_states.pt of rank(s) {extra}, but the checkpoint was saved by "
                        f"{expected} data-parallel ranks: a stale file of another run? Move "
                        f"{os.path.basename(ranks[extra[0]])!r}{' and the others' if len(extra) > 1 else ''} away")
    for path in sorted(files):
        try:
            with zipfile.ZipFile(path) as archive:  # reads the central directory at the end only
                archive.infolist()
        except zipfile.BadZipFile as err:
            with open(path, "rb") as f:
                legacy = f.read(1) == b"\x80"  # torch's pre-1.6 format, a pickle: not checkable here
            if not legacy:
                problems.append(f"{path!r} is truncated or corrupt ({err}): copy it again from the original")
        except OSError as err:
            problems.append(f"cannot read {path!r}: {err}")
    return problems


def checkpoint_problems(checkpoint_dir: str, tag: Optional[str] = None,
                        world_size: Optional[int] = None, zero_stage: Optional[int] = None) -> List[str]:
    """What stops loading a checkpoint's tag (``latest`` by default) with its optimizer state: a
    tag or model-states file that cannot be found or read, ``zero_file_problems`` for the saved
    data-parallel world size, no ``*optim_states.pt`` at all although the model-states file says
    the optimizer state was saved in them (ZeRO), given the loading run's ``zero_stage``, optimizer
    state kept where that stage does not look (stage 0 against 1/2; 1 and 2 load each other's),
    and, given its ``world_size``, a ZeRO checkpoint saved by another number of ranks (how to
    convert it)."""
    try:
        tag_dir = os.path.join(checkpoint_dir, resolve_tag(checkpoint_dir, tag))
        states = os.path.join(tag_dir, MODEL_STATES_FILE)
        if not os.path.isfile(states):
            return [f"{tag_dir!r} has no {MODEL_STATES_FILE} (an incomplete copy?)"]
        saved = read_torch_file(states)
    except ExportError as err:
        return [str(err)]
    world = saved.get("dp_world_size") if isinstance(saved, dict) else None
    world = world if isinstance(world, int) else None
    stage = zero_stage_of(saved)
    if stage and not glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        return [f"{tag_dir!r} holds no *optim_states.pt, but was saved with ZeRO stage {stage}"
                + (f" by {world} data-parallel ranks" if world else "")
                + ": the optimizer state is missing (an incomplete copy?)"]
    problems = zero_file_problems(tag_dir, world)
    if not problems and zero_stage is not None and bool(stage) != bool(zero_stage):
        where = "in *optim_states.pt" if stage else f"in {MODEL_STATES_FILE}"
        problems.append(f"{tag_dir!r} was saved with ZeRO stage {stage} (its optimizer state is {where}), but "
                        f"this run has ZeRO stage {zero_stage}: resume with stage "
                        f"{'1 or 2' if stage else '0'} (DeepSpeed cannot load it across stage 0 and 1/2)")
    if not problems and stage and world and world_size and world != world_size:
        problems.append(f"{tag_dir!r} was saved with ZeRO stage {stage} by {world} data-parallel ranks, not "
                        f"{world_size}: convert it with python -m deepspeed.checkpoint.ds_to_universal "
                        f"--input_folder {tag_dir} --output_folder {tag_dir}_universal --inject_missing_state, "
                        "then set \"checkpoint\": {\"load_universal\": true} in the DeepSpeed config for that one "
                        "resume, and remove it once the run has saved again (README: resuming at another world size)")
    return problems


def zero_stage_of(saved) -> int:
    """The ZeRO stage whose per-rank ``*optim_states.pt`` hold the optimizer state of a loaded
    model-states file, or 0 when the optimizer state is not in such files (stage 0)."""
    if not isinstance(saved, dict) or saved.get("optimizer") is not None:
        return 0
    ds_config = saved.get("ds_config")
    zero = ds_config.get("zero_optimization") if isinstance(ds_config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return stage if isinstance(stage, int) and stage > 0 else 0


def zero3_problem(folder: str) -> Optional[str]:
    """Why a tag folder of per-rank model states and no ``mp_rank_00`` file cannot be read: it was
    saved under ZeRO stage 3, which ds_bitter7 does not train or load (None for any other folder)."""
    if os.path.isfile(os.path.join(folder, MODEL_STATES_FILE)) or not glob.glob(
            os.path.join(folder, "*zero_pp_rank_*_model_states.pt")):
        return None
    return (f"{folder!r} was saved under ZeRO stage 3 (zero_pp_rank_*_model_states.pt, no {MODEL_STATES_FILE}): "
            "ds_bitter7 works with ZeRO stage 0, 1 and 2 checkpoints only")


def load_pruner_state(checkpoint_dir: str, tag: Optional[str]) -> Tuple[dict, str]:
    """(pruner state dict, the file it came from): `bitter7_state.pt` if present, else the
    `"bitter7"` client-state entry of the tag's model-states file (no tag: the file only)."""
    trainer_file = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    model_file = os.path.join(checkpoint_dir, tag if tag is not None else "", MODEL_STATES_FILE)
    if os.path.isfile(trainer_file):
        state, source = read_torch_file(trainer_file), trainer_file
    elif tag is not None and os.path.isfile(model_file):
        source = model_file
        state = read_torch_file(model_file)
        if not isinstance(state, dict) or STATE_KEY not in state:
            raise ExportError(f"no pruner state: {model_file!r} has no {STATE_KEY!r} client state and "
                              f"{trainer_file!r} does not exist (a dense checkpoint: prune and export it in "
                              "one step with python -m ds_bitter7.oneshot)")
        state = state[STATE_KEY]
    else:
        raise ExportError(zero3_problem(os.path.join(checkpoint_dir, tag))
                          or f"no pruner state: neither {trainer_file!r} nor {model_file!r} exists")
    masks = state.get("masks") if isinstance(state, dict) else None
    if isinstance(masks, dict) and not masks and state.get("structures") == ["unstructured"]:
        raise ExportError(f"pruner state in {source!r} has no structured units (structures: ['unstructured']): "
                          "unstructured pruning zeroes weights in place and removes nothing, so there is no "
                          "smaller model to export; the checkpoint's own weights are the pruned model")
    if not isinstance(masks, dict) or not masks:
        raise ExportError(f"pruner state in {source!r} is corrupt: expected a dict with a non-empty 'masks' "
                          f"dict, got {type(state).__name__} with keys {list(state)[:8] if isinstance(state, dict) else '-'}")
    return state, source


def consolidate(checkpoint_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """fp32 weights via DeepSpeed's zero_to_fp32 (``bf16_optimizer_masters`` for the files of the
    BF16_Optimizer, which it refuses); without optimizer files (stage 0) the module weights saved
    in the model-states file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(checkpoint_dir, tag)
    model_file = os.path.join(tag_dir, MODEL_STATES_FILE)
    zero_files = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    if zero_files:
        problems = checkpoint_problems(checkpoint_dir, tag)
        if problems:
            raise ExportError("; ".join(problems))
        if all(os.path.basename(f).startswith(BF16_OPTIMIZER_PREFIX) for f in zero_files):
            return bf16_optimizer_masters(tag_dir, zero_files)
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
            return strip_module_prefix(state)
        except Exception as err:  # a truncated shard, a missing rank's file, ...: name the folder
            if not (isinstance(err, ValueError) and "is not a zero checkpoint" in str(err)):
                raise ExportError(f"cannot consolidate {tag_dir!r} with DeepSpeed's zero_to_fp32: "
                                  f"{type(err).__name__}: {err}") from err
            logger.warning("%s: not a ZeRO checkpoint; using the module weights of %s", tag_dir, MODEL_STATES_FILE)
    if not os.path.isfile(model_file):
        raise ExportError(f"no weights: {tag_dir!r} has neither *optim_states.pt nor {MODEL_STATES_FILE}")
    saved = read_torch_file(model_file)
    module = saved.get("module") if isinstance(saved, dict) else None
    if not isinstance(module, Mapping):
        raise ExportError(f"{model_file!r} has no 'module' state dict")
    stage = zero_stage_of(saved)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in module.values() if torch.is_tensor(v)})
    if stage and dtypes != ["float32"] and not zero_files:
        # fp32 training: the module weights are the masters; otherwise they are rounded copies
        logger.warning("%s was saved with ZeRO stage %d but holds no *optim_states.pt: exporting the %s module "
                       "weights of %s, not the fp32 master weights (copy the optimizer files too for those)",
                       tag_dir, stage, "/".join(dtypes), MODEL_STATES_FILE)
    return strip_module_prefix({k: v.float() for k, v in module.items()})


def bf16_optimizer_masters(tag_dir: str, files: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint of DeepSpeed's ``BF16_Optimizer`` (bf16 with fp32
    gradient accumulation; ``zero_to_fp32`` refuses its files). Each param group is one flat
    buffer of its parameters in ``param_shapes`` order, padded at its end and cut into one equal
    partition per rank, ``single_partition_of_fp32_groups`` in each rank's file. Buffers, frozen
    parameters and tied copies come from the module weights."""
    saved = read_torch_file(os.path.join(tag_dir, MODEL_STATES_FILE))
    module = saved.get("module") if isinstance(saved, dict) else None
    shapes = saved.get("param_shapes") if isinstance(saved, dict) else None
    if not isinstance(module, Mapping) or not isinstance(shapes, list):
        raise ExportError(f"{os.path.join(tag_dir, MODEL_STATES_FILE)!r} lacks 'module' or 'param_shapes'")
    ranked = sorted(files, key=lambda f: int(os.path.basename(f)[len(BF16_OPTIMIZER_PREFIX):].split("_")[0]))
    states = []
    for path in ranked:
        state = read_torch_file(path)
        state = state.get("optimizer_state_dict") if isinstance(state, dict) else None
        if not isinstance(state, dict) or not isinstance(state.get("single_partition_of_fp32_groups"), list):
            raise ExportError(f"{path!r} has no 'single_partition_of_fp32_groups' (not a BF16_Optimizer state)")
        states.append(state)
    out = {k: v.float() for k, v in module.items() if torch.is_tensor(v)}
    for g, group in enumerate(shapes):
        parts = [state["single_partition_of_fp32_groups"][g] for state in states]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        padding = sum(int(state.get("group_paddings", [0] * len(shapes))[g]) for state in states)
        size = sum(math.prod(shape) for shape in group.values())
        if size + padding != flat.numel():
            raise ExportError(f"{tag_dir!r}: param group {g}'s {size} weights (+{padding} padding) do not fill the "
                              f"{flat.numel()} fp32 master values of its {len(states)} rank file(s)")
        offset = 0
        for name, shape in group.items():
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].float().view(tuple(shape)).clone()
            offset += n
    for alias, source in (saved.get("shared_params") or {}).items():  # tied weights: one master
        out[alias] = out[source]
    return strip_module_prefix(out)


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # A model wrapped before deepspeed.initialize (DDP-style) names its params "module.*".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_config(checkpoint_dir: str, model_config: Optional[str] = None):
    """The HF config from `model_config` (a folder) or CHECKPOINT_DIR/config.json."""
    folder = model_config or checkpoint_dir
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        hint = "" if model_config else " (pass --model_config DIR with the training model's config.json)"
        raise ExportError(f"no model config: {path!r} does not exist{hint}")
    try:
        return AutoConfig.from_pretrained(folder), folder
    except (OSError, ValueError, KeyError) as err:  # bad JSON, no or unknown model_type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"model config {path!r} cannot be read by transformers: {first}") from None


def add_missing_biases_(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give nn.Linear layers a bias where the checkpoint has one the config does not declare
    (the pruner adds a compensation bias to LLaMA's down_proj / o_proj)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for key, value in state_dict.items():
        if key in params or not key.endswith(".bias"):
            continue
        module = modules.get(key[: -len(".bias")])
        if isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(value, dtype=module.weight.dtype))


def build_model(config, state_dict: Mapping[str, torch.Tensor], source: str) -> PreTrainedModel:
    """A model of `config` holding the consolidated weights (fp32); raises naming `source`."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    add_missing_biases_(model, state_dict)
    missing, unexpected = key_mismatch(model, state_dict)
    if missing or unexpected:
        raise ExportError(f"weights in {source!r} do not fit the {config.model_type} config: "
                          f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # same names, other shapes: another model's config.json
        detail = "; ".join(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        raise ExportError(f"weights in {source!r} do not fit the {config.model_type} config "
                          f"({detail or err}): pass the training run's config with --model_config") from None
    model.tie_weights()
    return model.eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def json_safe(obj):
    """``obj`` with non-finite floats (an event that pruned nothing has a nan threshold) as None:
    strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _write_reports(folder: str, report: dict) -> None:
    with open(os.path.join(folder, REPORT_FILE), "w") as f:
        json.dump(json_safe(report), f, indent=2, allow_nan=False, default=str)
    lines = [
        "# Pruning report", "",
        f"- source: `{report.get('source') or '-'}` (step {report.get('step', '-')})",
        f"- model type: `{report['model_type_in']}` → `{report['model_type_out']}`",
        f"- parameters: {report['params_before']:,} → {report['params_after']:,} "
        f"({100 * (1 - report['params_after'] / report['params_before']):.1f}% fewer)", "",
        "| layer | kind | units kept / total | params before | params after |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in report["layers"]:
        zero = " (the model keeps one all-zero unit)" if r.get("units_in_model", r["units_kept"]) > r["units_kept"] else ""
        lines.append(f"| {r['layer']} | {r['kind']} | {r['units_kept']} / {r['units_total']}{zero} | "
                     f"{r['params_before']:,} | {r['params_after']:,} |")
    with open(os.path.join(folder, "pruning_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(output_dir: str, overwrite: bool, keep: Sequence[Optional[str]] = ()) -> None:
    """Raise ``ExportError`` unless ``output_dir`` may be written: it does not exist, or, with
    ``overwrite``, it is an empty folder or a previous export (holds ``pruning_report.json``) and
    holds none of the ``keep`` paths (the checkpoint and config being read). Nothing else is ever
    deleted. Its nearest existing ancestor must be a folder (the export makes the missing ones)."""
    ancestor = os.path.dirname(os.path.abspath(output_dir))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ExportError(f"output directory {output_dir!r} cannot be made: {ancestor!r} is a file, not a folder")
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise ExportError(f"output directory {output_dir!r} already exists (pass --overwrite)")
    if os.path.islink(output_dir):
        raise ExportError(f"output path {output_dir!r} is a symbolic link: --overwrite replaces only a real "
                          "folder; choose another OUTPUT_DIR")
    if not os.path.isdir(output_dir):
        raise ExportError(f"output path {output_dir!r} exists and is not a folder: choose another OUTPUT_DIR")
    paths = [p for p in keep if p]
    # the entries too (a tag folder linked from elsewhere), but for a previous export kept beside them
    paths += [os.path.join(p, e) for p in paths if os.path.isdir(p) for e in os.listdir(p)
              if os.path.islink(os.path.join(p, e)) or not os.path.isfile(os.path.join(p, e, REPORT_FILE))]
    for path in paths:
        if is_within(path, output_dir):
            raise ExportError(f"--overwrite would delete {path!r}, which is being read: it is inside output "
                              f"directory {output_dir!r}; choose another OUTPUT_DIR")
    entries = os.listdir(output_dir)
    if entries and REPORT_FILE not in entries:
        raise ExportError(f"--overwrite replaces only an empty folder or a previous export (one holding "
                          f"{REPORT_FILE}); {output_dir!r} holds other files ({', '.join(sorted(entries)[:3])}"
                          f"{', ...' if len(entries) > 3 else ''}): choose another OUTPUT_DIR")


def _write_remote_code(folder: str, model_type: str) -> None:
    """For a bitter7_* type: its module files and ``auto_map``, so that
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` needs no ds_bitter7."""
    from .models import remote_code

    files, auto_map = remote_code(model_type)
    if not files:
        return
    for name, source in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(source)
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["auto_map"] = auto_map
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _publish(tmp: str, output_dir: str, overwrite: bool, keep: Sequence[Optional[str]]) -> None:
    """Rename the finished temporary folder to output_dir (replacing only what ``check_output_dir``
    allows)."""
    check_output_dir(output_dir, overwrite, keep)
    old = None
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(output_dir), prefix=f".{os.path.basename(output_dir)}.old-")
        os.rmdir(old)
        os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export_model(model: PreTrainedModel, masks: Mapping[str, torch.Tensor], output_dir: str, *,
                 dtype: Optional[str] = None, overwrite: bool = False, source: Optional[str] = None,
                 extra: Optional[dict] = None, copy_from: Optional[str] = None, tokenizer=None,
                 params_before: Optional[int] = None) -> dict:
    """Zero the pruned units (for safety), shrink, and write the HF model and reports atomically,
    with the tokenizer files found in ``copy_from``, or ``tokenizer`` saved (a transformers one).
    ``params_before``: the size to report for the model before pruning (default: ``model``'s, which
    counts the compensation biases the pruner added to it).

    Returns the report dict (also written as pruning_report.json).
    """
    validate_masks(masks, unit_counts(model.state_dict(), model.config), source=f"masks from {source or 'caller'}")
    zero_pruned_units_(model, masks)
    small, layers = shrink_model(model, masks)
    if dtype is not None:
        small = small.to(_DTYPES[dtype])
    report = {"source": source, **(extra or {}), "model_type_in": model.config.model_type,
              "model_type_out": small.config.model_type,
              "params_before": _count(model) if params_before is None else params_before,
              "params_after": _count(small), "layers": layers}
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    check_output_dir(output_dir, overwrite, (source, copy_from))  # before the work, and again at the rename
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.tmp-")
    os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it private to the owner
    try:
        small.save_pretrained(tmp)
        _write_remote_code(tmp, small.config.model_type)
        for name in _TOKENIZER_FILES if copy_from else ():
            if os.path.isfile(os.path.join(copy_from, name)):
                shutil.copy2(os.path.join(copy_from, name), tmp)
        if hasattr(tokenizer, "save_pretrained"):  # the byte tokenizer has no files
            tokenizer.save_pretrained(tmp)
        _write_reports(tmp, report)
        for name in os.listdir(tmp):  # safetensors writes the weights private to the owner
            if os.path.isfile(os.path.join(tmp, name)):
                os.chmod(os.path.join(tmp, name), umask_mode(0o666))
        _publish(tmp, output_dir, overwrite, (source, copy_from))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s: %d -> %d parameters", output_dir, report["params_before"], report["params_after"])
    return report


def model_only_checkpoint(checkpoint_dir: str, tag: Optional[str]) -> bool:
    """Whether ``checkpoint_dir`` is a Trainer checkpoint saved with ``save_only_model=True``: the
    model's weights and ``bitter7_state.pt``, and no DeepSpeed checkpoint (no ``latest``, no tag)."""
    return (tag is None and os.path.isdir(checkpoint_dir)
            and not os.path.exists(os.path.join(checkpoint_dir, "latest"))
            and not glob.glob(os.path.join(checkpoint_dir, "global_step*"))
            and os.path.isfile(os.path.join(checkpoint_dir, TRAINER_STATE_FILE))
            and any(os.path.isfile(os.path.join(checkpoint_dir, f)) for f in SAVED_MODEL_FILES))


def read_saved_model(folder: str) -> Dict[str, torch.Tensor]:
    """The weights a Trainer saved in ``folder`` (safetensors or .bin, sharded or not), as fp32."""
    from transformers.modeling_utils import load_state_dict

    index = next((os.path.join(folder, f) for f in SAVED_MODEL_FILES if f.endswith(".index.json")
                  and os.path.isfile(os.path.join(folder, f))), None)
    try:
        if index is not None:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            shards = [next(f for f in SAVED_MODEL_FILES if os.path.isfile(os.path.join(folder, f)))]
        state = {}
        for shard in shards:
            state.update(load_state_dict(os.path.join(folder, shard)))
    except Exception as err:  # a truncated shard, a bad index: name the folder
        raise ExportError(f"cannot read the model weights in {folder!r}: {type(err).__name__}: {err}") from err
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    if dtypes != ["float32"]:
        logger.warning("%s: exporting the %s weights the Trainer saved (save_only_model: no fp32 master weights)",
                       folder, "/".join(dtypes))
    return {k: v.float() for k, v in state.items()}


def export_checkpoint(checkpoint_dir: str, output_dir: str, *, tag: Optional[str] = None,
                      model_config: Optional[str] = None, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Consolidate a DeepSpeed/Trainer checkpoint, shrink it with its pruner masks, and write it.
    A Trainer checkpoint saved with ``save_only_model=True`` gives its saved weights instead."""
    check_output_dir(os.path.abspath(output_dir), overwrite, (checkpoint_dir, model_config))
    if model_only_checkpoint(checkpoint_dir, tag):
        state, state_file = load_pruner_state(checkpoint_dir, None)
        config, config_dir = load_config(checkpoint_dir, model_config)
        weights = read_saved_model(checkpoint_dir)
        tag, source = None, checkpoint_dir
    else:
        tag = resolve_tag(checkpoint_dir, tag)
        state, state_file = load_pruner_state(checkpoint_dir, tag)
        config, config_dir = load_config(checkpoint_dir, model_config)
        weights = consolidate(checkpoint_dir, tag)
        source = os.path.join(checkpoint_dir, tag)
    model = build_model(config, weights, source)
    masks = state["masks"]
    try:
        validate_masks(masks, unit_counts(model.state_dict(), config), source=f"masks in {state_file!r}")
    except ValueError as err:
        raise ExportError(str(err)) from err
    extra = {"tag": tag, "step": state.get("step"), "structures": state.get("structures")}
    return export_model(model, masks, output_dir, dtype=dtype, overwrite=overwrite,
                        source=os.path.abspath(checkpoint_dir), extra=extra, copy_from=config_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_bitter7.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="folder given to engine.save_checkpoint, or a Trainer checkpoint-N")
    parser.add_argument("output_dir", help="where to write the smaller Hugging Face model")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--model_config", default=None, help="folder with the model's config.json "
                        "(default: CHECKPOINT_DIR)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it is empty or a "
                        "previous export (holds pruning_report.json); nothing else is deleted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = export_checkpoint(args.checkpoint_dir, args.output_dir, tag=args.tag,
                                   model_config=args.model_config, dtype=args.dtype, overwrite=args.overwrite)
    except (ExportError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {report['model_type_out']}, parameters "
          f"{report['params_before']:,} -> {report['params_after']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
