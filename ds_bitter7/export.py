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
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .checkpoint_files import EXPORT_REPORT_FILE as REPORT_FILE
from .checkpoint_files import (
    ExportError,
    consolidate,
    load_pruner_state,
    model_only_checkpoint,
    read_saved_model,
    resolve_tag,
)
from .shrink import key_mismatch, shrink_model, unit_counts, validate_masks, zero_pruned_units_
from .state import atomic_write, umask_mode

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(checkpoint_dir: str, model_config: Optional[str] = None):
    """The HF config from `model_config` (a folder) or CHECKPOINT_DIR/config.json."""
    folder = model_config or checkpoint_dir
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        hint = "" if model_config else (" (pass --model_config DIR, model_config= from Python, with the training "
                                        "model's config.json)")
        raise ExportError(f"no model config: {path!r} does not exist{hint}")
    try:
        return AutoConfig.from_pretrained(folder), folder
    except (OSError, ValueError, KeyError) as err:  # bad JSON, no or unknown model_type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"model config {path!r} cannot be read by transformers: {first}") from None


def load_generation_config(folder: str):
    """The ``GenerationConfig`` saved in ``folder`` (a chat model's stop tokens, sampling
    defaults: not in config.json), or None where there is none."""
    from transformers import GenerationConfig

    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    try:
        return GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"generation config {path!r} cannot be read by transformers: {first}") from None


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


def build_model(config, state_dict: Mapping[str, torch.Tensor], source: str) -> Tuple[PreTrainedModel, int]:
    """A model of `config` holding the consolidated weights (fp32), and the number of parameters
    before the pruner added its compensation biases; raises naming `source`."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params_before = _count(model)
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
    return model.eval(), params_before


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


def nearest_existing(path: str) -> str:
    """The nearest existing ancestor of ``path`` (what decides whether it can be made)."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor


def unwritable(path: str) -> Optional[str]:
    """Why ``path`` (a file or folder to be made, with any missing parents) cannot be: its nearest
    existing ancestor is a file, or a folder this process may not write in (``os.access``, which
    also says so for a read-only file system); else None."""
    ancestor = nearest_existing(path)
    if not os.path.isdir(ancestor):
        return f"{ancestor!r} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"no permission to write in {ancestor!r}"
    return None


def check_output_dir(output_dir: str, overwrite: bool, keep: Sequence[Optional[str]] = ()) -> None:
    """Raise ``ExportError`` unless ``output_dir`` may be written: it does not exist, or, with
    ``overwrite``, it is an empty folder or a previous export (holds ``pruning_report.json``) and
    holds none of the ``keep`` paths (the checkpoint and config being read). Nothing else is ever
    deleted. Its nearest existing ancestor must be a folder (the export makes the missing ones)."""
    problem = unwritable(output_dir)  # the export is written beside OUTPUT_DIR, then renamed
    if problem:
        raise ExportError(f"output directory {output_dir!r} cannot be written: {problem}")
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise ExportError(f"output directory {output_dir!r} already exists (pass --overwrite)")
    if os.path.islink(output_dir):
        raise ExportError(f"output path {output_dir!r} is a symbolic link: --overwrite replaces only a real "
                          "folder; choose another OUTPUT_DIR")
    if not os.path.isdir(output_dir):
        raise ExportError(f"output path {output_dir!r} exists and is not a folder: choose another OUTPUT_DIR")
    if os.path.ismount(output_dir):
        raise ExportError(f"output directory {output_dir!r} is a mount point, which --overwrite cannot replace (it "
                          "renames the folder): choose a folder inside it")
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


def write_remote_code(folder: str, model_type: str) -> None:
    """For a bitter7_* type: its module files and ``auto_map`` beside ``folder``'s config.json, so that
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` needs no ds_bitter7
    (nothing for a standard type; the module files only where the folder has no config.json yet)."""
    from .models import remote_code

    files, auto_map = remote_code(model_type)
    if not files:
        return
    for name, source in files.items():
        atomic_write(os.path.join(folder, name), lambda f, text=source: f.write(text.encode("utf-8")))
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["auto_map"] = auto_map
    # atomic: a Trainer checkpoint's config.json is rewritten in place (by every node's writer, with
    # save_on_each_node on a shared file system), and a kill mid-write must not leave it truncated
    atomic_write(path, lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode("utf-8")))


def _publish(tmp: str, output_dir: str, overwrite: bool, keep: Sequence[Optional[str]]) -> None:
    """Rename the finished temporary folder to output_dir (replacing only what ``check_output_dir``
    allows)."""
    check_output_dir(output_dir, overwrite, keep)
    old = None
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(output_dir), prefix=f".{os.path.basename(output_dir)}.old-")
        os.rmdir(old)
        os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except OSError as err:
        if old:  # the previous export back in place, not left hidden
            try:
                os.rename(old, output_dir)
            except OSError as back:
                raise OSError(f"could not rename the export to {output_dir!r} ({err}), nor put the previous "
                              f"export back ({back}): it is in {old!r}") from err
        raise
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
        write_remote_code(tmp, small.config.model_type)
        for name in TOKENIZER_FILES if copy_from else ():
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
    model, params_before = build_model(config, weights, source)
    masks = state["masks"]
    try:
        validate_masks(masks, unit_counts(model.state_dict(), config), source=f"masks in {state_file!r}")
    except ValueError as err:
        raise ExportError(str(err)) from err
    extra = {"tag": tag, "step": state.get("step"), "structures": state.get("structures")}
    return export_model(model, masks, output_dir, dtype=dtype, overwrite=overwrite,
                        source=os.path.abspath(checkpoint_dir), extra=extra, copy_from=config_dir,
                        params_before=params_before)


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
