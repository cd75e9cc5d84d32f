"""A DeepSpeed checkpoint folder's files, read offline (no engine, no collective): its tag, the
per-rank files a load needs, the fp32 weights (DeepSpeed's ``zero_to_fp32``, or the masters of its
``BF16_Optimizer``), the pruner state, and a Hugging Face Trainer's model-only checkpoint. Export,
one-shot and resume read checkpoints through these; a problem raises ``ExportError`` naming the file.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import zipfile
import zlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .state import CLIENT_KEY as STATE_KEY
from .state import MODEL_STATES_FILE, checkpoint_tags, latest_tag
from .state import TRAINER_FILE as TRAINER_STATE_FILE
from .state import read_torch_file as _read_torch_file

logger = logging.getLogger(__name__)

SAVED_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")  # a Trainer's model weights
BF16_OPTIMIZER_PREFIX = "bf16_zero_pp_rank_"  # DeepSpeed's BF16_Optimizer's rank files
EXPORT_REPORT_FILE = "pruning_report.json"  # marks a folder as an export (``--overwrite`` replaces only those)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message names the file at fault."""


def resolve_tag(checkpoint_dir: str, tag: Optional[str] = None) -> str:
    """The checkpoint tag: `tag`, else the `latest` file, else the single `global_step*` folder."""
    if not os.path.isdir(checkpoint_dir):
        raise ExportError(f"checkpoint directory {checkpoint_dir!r} " + ("is a file: name the folder given to "
                          "save_checkpoint" if os.path.exists(checkpoint_dir) else "does not exist"))
    if tag is None:
        latest, tag = os.path.join(checkpoint_dir, "latest"), latest_tag(checkpoint_dir)
        if tag == "":
            raise ExportError(f"{latest!r} is empty (it should name a tag folder); pass --tag")
        if tag is None:
            steps = sorted(os.path.basename(p) for p in glob.glob(os.path.join(checkpoint_dir, "global_step*")))
            if len(steps) != 1:
                found = f"found tag folders {steps}" if steps else "no global_step* folder either"
                trainer = sorted((os.path.basename(p) for p in glob.glob(os.path.join(checkpoint_dir, "checkpoint-*"))),
                                 key=lambda name: (len(name), name))
                weights = [f for f in SAVED_MODEL_FILES if os.path.isfile(os.path.join(checkpoint_dir, f))]
                tag_folder = tag_folder_hint(checkpoint_dir)
                if tag_folder and not steps:
                    hint = tag_folder
                elif trainer and not steps:
                    hint = f"a Trainer output_dir: pass one of its checkpoint folders ({', '.join(trainer[-3:])})"
                elif weights and not steps and os.path.isfile(os.path.join(checkpoint_dir, EXPORT_REPORT_FILE)):
                    hint = (f"it is an export ({EXPORT_REPORT_FILE}): pruned already and without optimizer state; to "
                            "prune it further, train it (launch/train.py --model DIR) and prune that run's checkpoint")
                elif weights and not steps:  # a Trainer checkpoint saved with save_only_model=True
                    hint = (f"it holds model weights ({weights[0]}) but no {TRAINER_STATE_FILE} beside them: no pruner "
                            "masks to read (Bitter7Callback writes that file at each save; a run killed in between, "
                            "or one without the callback, leaves none)")
                else:
                    hint = "pass --tag"
                raise ExportError(f"no 'latest' file at {latest!r} ({found}); {hint}")
            tag = steps[0]
    folder, root = os.path.abspath(os.path.join(checkpoint_dir, tag)), os.path.abspath(checkpoint_dir)  # an
    # absolute tag replaces checkpoint_dir: one inside it is taken as its path there
    if not folder.startswith(root.rstrip(os.sep) + os.sep):
        raise ExportError(f"tag {tag!r} names no tag folder inside {checkpoint_dir!r} (the folder itself, or one "
                          f"outside it): pass a tag such as {', '.join(checkpoint_tags(checkpoint_dir)) or 'global_step100'}")
    tag = os.path.relpath(folder, root)
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        hint = tag_folder_hint(checkpoint_dir)
        raise ExportError(f"checkpoint tag folder {os.path.join(checkpoint_dir, tag)!r} does not exist"
                          + (f"; {hint}" if hint else ""))
    return tag


def tag_folder_hint(folder: str) -> Optional[str]:
    """What to pass instead when ``folder`` is a tag folder itself (it holds DeepSpeed's rank
    files, ``*model_states.pt``), else None."""
    found = sorted(glob.glob(os.path.join(folder, "*model_states.pt")))
    if not found:
        return None
    folder = os.path.abspath(folder)
    return (f"it holds {os.path.basename(found[0])}, so it is a tag folder itself: pass the folder above it "
            f"({os.path.dirname(folder)!r}), with --tag {os.path.basename(folder)} for this step")


def read_torch_file(path: str):
    """torch.load (memory-mapped, on the CPU), with an ``ExportError`` naming a bad file."""
    return _read_torch_file(path, ExportError)


def zero_file_problems(tag_dir: str, dp_world_size: Optional[int] = None) -> List[str]:
    """What is wrong with a tag folder's per-rank ZeRO files, read without loading them: a rank's
    ``*optim_states.pt`` missing (ranks 0..N-1, N the saved ``dp_world_size`` when known), or a
    file that is not a complete archive (truncated copy) or whose pickle fails its CRC (a bad
    copy: it failed on one rank inside DeepSpeed's loading). Local: checked before any rank starts
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
    contents = {}  # rank -> its tensors' CRCs and sizes, from the central directory (no tensor is read)
    for path in sorted(files):
        try:
            with zipfile.ZipFile(path) as archive:  # the central directory, at the end
                data = tuple(sorted((i.filename.rsplit("/", 1)[-1], i.CRC, i.file_size) for i in archive.infolist()
                                    if "/data/" in i.filename))
                if any(crc for _, crc, _ in data):  # torch wrote CRCs (else nothing to compare)
                    contents[next(r for r, p in ranks.items() if p == path)] = data
                for info in archive.infolist():  # and the CRC of every record but the tensors' storages (the
                    # pickle: small; a full read would double the load's I/O), where torch wrote one (CRC 0:
                    # torch.serialization.set_crc32_options(False))
                    if "/data/" not in info.filename and info.CRC:
                        archive.read(info)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error) as err:
            with open(path, "rb") as f:
                legacy = f.read(1) == b"\x80"  # torch's pre-1.6 format, a pickle: not checkable here
            if not legacy:
                problems.append(f"{path!r} is truncated or corrupt ({err}): copy it again from the original")
        except OSError as err:
            problems.append(f"cannot read {path!r}: {err}")
    return problems or mixed_zero_files(ranks, contents)


def _adam_steps(path: str) -> Optional[tuple]:
    """The Adam steps a ZeRO rank file holds, memory-mapped (its tensors are not read); None for a
    layout this does not know."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        states = saved["base_optimizer_state"]["state"].values()
        return tuple(sorted({float(s["step"]) for s in states if isinstance(s, dict) and "step" in s}))
    except Exception:  # noqa: BLE001 - another optimizer's layout: DeepSpeed's loading checks it
        return None


def mixed_zero_files(ranks: Mapping[int, str], contents: Mapping[int, tuple]) -> List[str]:
    """Rank files (``{rank: path}``) of one tag that are not of one save: Adam steps that differ (a
    rank's file of another save copied in), or two ranks whose tensors are the same bytes (``contents``:
    each rank's tensor CRCs and sizes; one rank's file copied over another's). DeepSpeed loads
    either without a word: the model's weights are then partly another step's, or one rank's
    partition twice. (Two ranks' partitions may cover the same parameter ranges, inside one large
    embedding: their bytes differ.)"""
    steps: Dict[tuple, List[int]] = {}
    for rank, path in sorted(ranks.items()):
        step = _adam_steps(path)
        if step is not None:
            steps.setdefault(step, []).append(rank)
    if len(steps) > 1:
        found = "; ".join(f"{', '.join(str(int(s)) for s in step) or 'none'} in rank(s) {r}" for step, r in steps.items())
        return [f"the ZeRO rank files of {os.path.dirname(next(iter(ranks.values())))!r} hold different optimizer "
                f"steps ({found}): a rank's file of another save was copied in; copy the tag folder again"]
    owners: Dict[tuple, List[int]] = {}
    for rank, data in sorted(contents.items()):
        owners.setdefault(data, []).append(rank)
    twice = [r for r in owners.values() if len(r) > 1]
    if twice:
        return [f"the ZeRO rank files of ranks {twice[0]} in {os.path.dirname(ranks[twice[0][0]])!r} hold the same "
                "tensors: one rank's file was copied over another's; copy the tag folder again"]
    return []


def checkpoint_problems(checkpoint_dir: str, tag: Optional[str] = None, world_size: Optional[int] = None,
                        zero_stage: Optional[int] = None, bf16: Optional[bool] = None) -> List[str]:
    """What stops loading a checkpoint's tag (``latest`` by default) with its optimizer state: a
    tag or model-states file that cannot be found or read, ``zero_file_problems`` for the saved
    data-parallel world size, no ``*optim_states.pt`` at all although the model-states file says
    the optimizer state was saved in them (ZeRO), given the loading run's ``zero_stage``, optimizer
    state kept where that stage does not look (stage 0 against 1/2; 1 and 2 load each other's),
    and, given its ``world_size``, a ZeRO checkpoint saved by another number of ranks (how to
    convert it), given ``bf16`` (whether the loading run enables it), ZeRO files of the other
    precision (``precision_problem``)."""
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
    if not problems and stage and bf16 is not None:
        problems += [p for p in (precision_problem(glob.glob(os.path.join(tag_dir, "*optim_states.pt")), bf16,
                                                   "this run"),) if p]
    if not problems and stage and world and world_size and world != world_size:
        problems.append(f"{tag_dir!r} was saved with ZeRO stage {stage} by {world} data-parallel ranks, not "
                        f"{world_size}: convert it with python -m deepspeed.checkpoint.ds_to_universal "
                        f"--input_folder {tag_dir} --output_folder {tag_dir}_universal --inject_missing_state, "
                        "then set \"checkpoint\": {\"load_universal\": true} in the DeepSpeed config for that one "
                        "resume, and remove it once the run has saved again (README: resuming at another world size)")
    return problems


def precision_problem(zero_files: List[str], bf16: bool, who: str) -> Optional[str]:
    """Why a run with (``bf16``) or without bf16 cannot load these ZeRO files: DeepSpeed names a bf16
    run's ``bf16_zero_pp_rank_*`` and looks for that name only; else None. ``who``: the loading run."""
    if not zero_files:
        return None
    saved = all(os.path.basename(f).startswith("bf16_") for f in zero_files)
    if saved == bf16:
        return None
    return (f"{who} {'enables' if bf16 else 'does not enable'} bf16, but checkpoint "
            f"{os.path.dirname(zero_files[0])!r} was saved {'with' if saved else 'without'} it "
            f"({os.path.basename(zero_files[0])}): DeepSpeed can only load it with bf16 {'on' if saved else 'off'}")


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


def saved_pruner_state(checkpoint_dir: str, tag: Optional[str]) -> Tuple[object, Optional[str]]:
    """(the pruner state a checkpoint holds, the file it came from), or (None, None): the
    ``"bitter7"`` client-state entry of the tag's model-states file, which DeepSpeed saves together
    with the weights, else ``bitter7_state.pt`` (the Trainer callback's copy, for a checkpoint
    without DeepSpeed files). The callback writes its copy after the checkpoint, so a run redone
    from an earlier checkpoint and stopped between the two writes leaves the earlier run's file
    beside the new weights: it never wins over the checkpoint's own."""
    model_file = os.path.join(checkpoint_dir, tag, MODEL_STATES_FILE) if tag is not None else None
    if model_file and os.path.isfile(model_file):
        states = read_torch_file(model_file)  # memory-mapped: the weights are not read
        if isinstance(states, dict) and STATE_KEY in states:
            return states[STATE_KEY], model_file
    trainer_file = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    if os.path.isfile(trainer_file):
        return read_torch_file(trainer_file), trainer_file
    return None, None


def load_pruner_state(checkpoint_dir: str, tag: Optional[str]) -> Tuple[dict, str]:
    """(pruner state dict, the file it came from): ``saved_pruner_state``, with an ``ExportError``
    saying what is missing or wrong."""
    state, source = saved_pruner_state(checkpoint_dir, tag)
    if source is None:
        trainer_file = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
        model_file = os.path.join(checkpoint_dir, tag if tag is not None else "", MODEL_STATES_FILE)
        if tag is not None and os.path.isfile(model_file):
            raise ExportError(f"no pruner state: {model_file!r} has no {STATE_KEY!r} client state and "
                              f"{trainer_file!r} does not exist (a dense checkpoint: prune and export it in "
                              "one step with python -m ds_bitter7.oneshot)")
        raise ExportError((zero3_problem(os.path.join(checkpoint_dir, tag)) if tag is not None else None)
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
    BF16_Optimizer, which it refuses; bf16 ZeRO-1/2 files share their names but not their layout,
    and zero_to_fp32 reads those); without optimizer files (stage 0) the module weights saved in
    the model-states file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(checkpoint_dir, tag)
    model_file = os.path.join(tag_dir, MODEL_STATES_FILE)
    zero_files = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    if zero_files:
        problems = checkpoint_problems(checkpoint_dir, tag)
        if problems:
            raise ExportError("; ".join(problems))
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
            return strip_module_prefix(state)
        except Exception as err:  # a truncated shard, a missing rank's file, ...: name the folder
            if not (isinstance(err, ValueError) and "is not a zero checkpoint" in str(err)):
                raise ExportError(f"cannot consolidate {tag_dir!r} with DeepSpeed's zero_to_fp32: "
                                  f"{type(err).__name__}: {err}") from err
            # bf16 ZeRO-1/2 files (DeepSpeedZeroOptimizer) are also named bf16_zero_pp_rank_*; only the
            # BF16_Optimizer's (no 'zero_stage' in them) are refused by zero_to_fp32 and read here
            if all(os.path.basename(f).startswith(BF16_OPTIMIZER_PREFIX) for f in zero_files):
                return bf16_optimizer_masters(tag_dir, zero_files)
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
