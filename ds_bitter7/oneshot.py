"""One-shot pruning of a trained DeepSpeed checkpoint: score, calibrate, prune once, compensate, export.

    python -m ds_bitter7.oneshot CHECKPOINT_DIR OUTPUT_DIR --sparsity 0.5 [--score bitter7_obs]
        [--structures mlp_neuron ...] [--compensation none|mean|least_squares]
        [--calibration builtin|FILES] [--validation builtin|FILES] [--tag TAG] [--model_config DIR]

Runs on any number of ranks (``torchrun``, ``deepspeed``, ``mpirun``; plain ``python -m`` is one
rank). The checkpoint is loaded WITH its optimizer state (bitter7, fisher, bitter7_variance and the
default bitter7_obs read Adam's ``exp_avg_sq``; bitter7_obs, obs, fluctuation and bitter7_variance
also read activation statistics, as does compensation):
ZeRO 0/1/2 at its own world size directly, a ZeRO-1/2 checkpoint at another world size through
DeepSpeed's universal checkpoint conversion (run automatically into ``OUTPUT_DIR.universal_tmp``,
which must be on a file system every rank sees). Calibration statistics are gathered across ranks,
the pruner removes ``--sparsity`` of each structure type in ONE event (``pruner.prune_to``),
compensates the next layers, reports validation perplexity before and after, and rank 0 exports
the smaller Hugging Face model (``export_model``) with ``pruning_report.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import data as dsdata
from .checkpoint_loading import (
    CheckpointInfo,
    OneShotError,
    build_engine,
    check_model_matches,
    fit_checkpoint_biases,
    frozen_in_training,
)
from .comm import abort_job_on_error, launch_rank, log_main
from .config import StructureName, enum_name
from .evaluation import perplexity
from .export import is_within, json_safe
from .oneshot_args import (
    check_inputs,
    output_dir_problem,
    parse_args,
    unused_section,
)
from .structures import unit_groups, unstructured_params
from .threshold import n_to_prune

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data
def _texts(spec: Sequence[str], split: str):
    """A text dataset: the builtin corpus' ``split``, or every row of the local files."""
    if list(spec) == [dsdata.BUILTIN]:
        return dsdata.builtin_dataset(split)
    try:
        files = dsdata.local_files(spec)
        if files is None:  # check_data_spec ran first; a path removed since
            raise OneShotError(f"data paths do not exist: {[s for s in spec if not os.path.exists(s)]}")
        return dsdata.read_local_files(files)
    except ValueError as err:
        raise OneShotError(str(err)) from None


def calibration_data(args, tokenizer) -> List[Dict[str, torch.Tensor]]:
    """``num_batches`` batches per rank (different blocks on each rank) from the calibration data."""
    blocks = dsdata.chunk_dataset(_texts(args.calibration, "train"), tokenizer, args.seq_len,
                                  what=f"--calibration {' '.join(args.calibration)}")
    return dsdata.calibration_batches(blocks, args.batch_size, args.num_batches, args.seed)


def load_tokenizer(args, config, config_dir: str, trained_with: Optional[str] = None):
    """``--tokenizer`` (a folder, a hub name, or ``bytes``), else the one saved beside
    ``config.json``, else bytes: for a model whose vocabulary is the byte tokenizer's, or one
    ``trained_with`` bytes (``launch/train.py`` records it in the checkpoint); its ids must fit the model."""
    path = args.tokenizer or dsdata.tokenizer_beside(config_dir)
    if path is None and config.vocab_size > dsdata.BYTE_MODEL_VOCAB and trained_with != dsdata.BYTES:
        raise OneShotError(f"no tokenizer files beside {os.path.join(config_dir, 'config.json')} and no --tokenizer: "
                           f"the byte tokenizer would feed this model of {config.vocab_size} token ids the wrong "
                           "ids; pass the training run's tokenizer with --tokenizer DIR (--tokenizer bytes if it "
                           "trained on bytes)")
    if dsdata.tokenizer_change(trained_with, path or dsdata.BYTES)[0]:  # bytes where the run's was a folder, or the reverse
        log_main("the checkpoint's run trained with the tokenizer %r but this one-shot uses %r: calibration and "
                 "validation would feed the model other ids than it learned (pass --tokenizer with the "
                 "training run's tokenizer)", trained_with, path or dsdata.BYTES, level=logging.WARNING, log=logger)
    try:
        tokenizer = dsdata.get_tokenizer(path)
    except Exception as err:
        raise OneShotError(f"cannot load the tokenizer of {path!r}: {type(err).__name__}: {err}") from None
    n = dsdata.tokenizer_vocab_size(tokenizer)
    if n > config.vocab_size:
        raise OneShotError(f"the tokenizer ({path or 'bytes'}) has {n} ids but the model only {config.vocab_size}: "
                           "pass the training run's tokenizer with --tokenizer DIR")
    return tokenizer


def read_data(args, tokenizer, calibrate: bool, comm):
    """(calibration batches or None, validation loader or None), read before the checkpoint loads;
    a problem on any rank (unreadable file, too little text) fails every rank. Collective."""
    calib = val = error = None
    try:
        calib = calibration_data(args, tokenizer) if calibrate else None
        val = validation_loader(args, tokenizer) if args.validation else None
    except Exception as err:  # datasets' own errors do not always name the file
        what = f"--calibration {args.calibration}" if calib is None and calibrate else f"--validation {args.validation}"
        error = OneShotError(f"cannot read {what}: {type(err).__name__}: {err}")
    if comm.any(error is not None):
        raise error or OneShotError("another rank could not read the calibration or validation data "
                                    "(see its error)")
    return calib, val


def restore_training_masks(pruner, saved: dict, source: str) -> None:
    """Units pruned in training stay pruned: the saved masks of the structure types both runs prune
    (``check_args`` made sure the run prunes every saved type); a type only this run prunes starts
    fully kept. Unstructured zeros are in the weights already, and one-shot takes no step."""
    state = dict(saved)
    counts = {g.key: g.n_units for g in pruner.groups}
    state["structures"] = [enum_name(s) for s in pruner.config.structures]
    state["unit_counts"] = {**counts, **{k: v for k, v in (saved.get("unit_counts") or {}).items() if k in counts}}
    state["masks"] = {**{k: torch.ones(n, dtype=torch.bool) for k, n in counts.items()},
                      **{k: v for k, v in (saved.get("masks") or {}).items() if k in counts}}
    try:
        pruner.load_state_dict(state, source=source)
    except ValueError as err:
        raise OneShotError(str(err)) from None


def unstructured_zeros(model, info: CheckpointInfo) -> Dict[str, torch.Tensor]:
    """Of a checkpoint pruned with ``unstructured`` in training: where its block weights are exactly
    zero (its element masks are those zeros; the refit of least squares must not fill them in)."""
    if "unstructured" not in ((info.client_bitter7 or {}).get("structures") or ()):
        return {}
    return {n: model.get_parameter(n).detach().eq(0) for n in unstructured_params(model)}


def keep_zeros(model, zeros: Dict[str, torch.Tensor]) -> int:
    """Zero ``zeros`` again after the event (as training re-applies its element masks after a
    compensation); returns how many elements that is."""
    with torch.no_grad():
        for name, where in zeros.items():
            model.get_parameter(name).masked_fill_(where, 0)
    return sum(int(w.sum()) for w in zeros.values())


def check_frozen_units(model, info: CheckpointInfo, structures: Sequence[str]) -> None:
    """``OneShotError``, before the checkpoint loads, when a parameter frozen in training (in no
    optimizer group of the checkpoint) belongs to units of ``structures``: DeepSpeed keeps no fp32
    master or Adam state for it, so those units can be neither scored nor zeroed."""
    frozen = {kind: sorted(frozen_in_training({s.name for g in unit_groups(model, [StructureName(kind)])
                                               for s in g.slices}, info))
              for kind in ("mlp_neuron", "attention_head")}
    hit = [k for k in structures if frozen[k]]
    if hit:
        names, free = frozen[hit[0]], [k for k, v in frozen.items() if not v]
        raise OneShotError(
            f"{names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} was frozen in training (in no "
            f"optimizer group of {info.folder!r}) but belongs to the {hit[0]} units --structures prunes: they have "
            "no optimizer state to be scored or kept at zero by; "
            + (f"pass --structures {' '.join(free)}" if free else "no structure type is free of frozen parameters"))


def validation_loader(args, tokenizer, world: Optional[int] = None, rank: Optional[int] = None):
    """This rank's validation batches (``data.eval_dataloader``; default: this process's rank)."""
    blocks = dsdata.chunk_dataset(_texts(args.validation, "validation"), tokenizer, args.seq_len,
                                  what=f"--validation {' '.join(args.validation)}")
    return dsdata.eval_dataloader(blocks, args.batch_size, world, rank)


# --------------------------------------------------------------------------- export
def drop_unwritten_biases(model, added: Sequence[str]) -> None:
    """Remove the zero biases ``prepare_model`` added when compensation wrote none of them
    (``--sparsity 0``, or no unit removed): the export then keeps the checkpoint's architecture."""
    if added and all(not model.get_parameter(name).any() for name in added):
        for name in added:
            model.get_submodule(name.rsplit(".", 1)[0]).bias = None


# --------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The one-shot pipeline on every rank; returns the summary (identical on every rank)."""
    from transformers import AutoModelForCausalLM

    import ds_bitter7

    from .calibration import needs_stats
    from .comm import Communicator, init_distributed
    from .export import export_model, load_generation_config

    init_distributed()
    comm = Communicator()
    # every rank checks, and a problem on any stops them all: a node whose files differ (a
    # calibration file missing there) must not leave the others waiting
    error = None
    try:
        info, config, config_dir, cfg = check_inputs(args)
    except OneShotError as err:
        error = err
    comm.raise_if_any(error, "checking the arguments and the checkpoint", kind=OneShotError)
    # rank 0 writes OUTPUT_DIR: checked before any work (on every rank that sees it), every rank fails alike
    problem = output_dir_problem(args, config_dir)
    if comm.any(problem is not None):
        raise OneShotError(problem or "another rank cannot write the output directory (see its error)")
    found = args.tokenizer or dsdata.tokenizer_beside(config_dir)
    if not comm.same(str(found)):  # a node without the files beside config.json would tokenize bytes
        raise OneShotError(f"the ranks find different tokenizers beside {config_dir!r} (this rank: "
                           f"{found or 'bytes'}): a node misses the saved files; pass --tokenizer")
    tokenizer = comm.call("loading the tokenizer", load_tokenizer, args, config, config_dir, info.tokenizer,
                          kind=OneShotError)
    calib, val = read_data(args, tokenizer, needs_stats(cfg), comm)  # before the (long) checkpoint load
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = load_generation_config(config_dir) or model.generation_config
    params_before = sum(p.numel() for p in model.parameters())  # the model before any pruner added biases
    fit_checkpoint_biases(model, info)
    check_model_matches(model, info, config_dir)
    check_frozen_units(model, info, args.structures)
    engine = build_engine(args, info, model, comm)
    # zero biases for the out projections that still have none, added after loading: one-shot takes no
    # optimizer step, so they need no optimizer state (compensation writes them on every rank)
    added = ds_bitter7.prepare_model(engine.module, cfg)
    device = next(engine.module.parameters()).device
    calib = [{k: v.to(device) for k, v in b.items()} for b in calib] if calib is not None else None
    pruner = ds_bitter7.attach(engine, cfg, calib)
    warnings: List[str] = []  # the summary's

    def warn(message: str) -> None:
        warnings.append(message)
        log_main("%s", message, level=logging.WARNING, log=logger)

    unused = unused_section(args)
    if unused:
        warn(unused)
    if info.client_bitter7 is not None:  # a ds_bitter7 checkpoint: units pruned in training stay pruned
        restore_training_masks(pruner, info.client_bitter7, info.folder)
        already = already_pruned(pruner, args)
        if already:
            log_main("the checkpoint already prunes %s (in training): --sparsity %s removes no more of %s",
                     ", ".join(f"{f:.1%} of {k}" for k, f in already.items()), args.sparsity,
                     " or ".join(already), level=logging.WARNING, log=logger)
        past = layers_past_target(pruner, args)
        if past:
            warn(f"--scope per_layer: the checkpoint already prunes more than {args.sparsity:.1%} of "
                 f"{', '.join(past)} (in training): those units stay pruned, so more than --sparsity is pruned, "
                 "and the export has one width per layer only if every layer ends with the same count")
    summary: Dict[str, Any] = {"checkpoint": os.path.abspath(args.checkpoint_dir), "tag": info.tag,
                               "world_size": comm.world_size, "score": args.score,
                               "structures": list(args.structures), "sparsity": args.sparsity,
                               "compensation": args.compensation, "scope": args.scope, "seq_len": args.seq_len}
    if val is not None and args.eval_batches > 0:
        summary["ppl_before"] = perplexity(engine.module, val, args.eval_batches, comm)
    zeros = unstructured_zeros(engine.module, info)
    event = pruner.prune_to(args.sparsity)
    if zeros:
        summary["unstructured_zeros_kept"] = keep_zeros(engine.module, zeros)
    summary["event"] = {k: v for k, v in event.items() if k in ("sparsity", "thresholds", "compensation",
                                                                "seconds", "bytes", "stats_rows", "stats_passes")}
    short = shortfall(pruner, args)
    if short:
        warn(f"reached {', '.join(f'{v:.1%} of {k}' for k, v in short.items())}, not {args.sparsity:.1%}: "
             f"--min_units_per_layer {args.min_units_per_layer} keeps that many units in every layer (pass a "
             "smaller value to go further)")
    if warnings:
        summary["warning"] = "; ".join(warnings)
    if "ppl_before" in summary:
        summary["ppl_after"] = perplexity(engine.module, val, args.eval_batches, comm)
    drop_unwritten_biases(engine.module, added)
    error = None
    if comm.rank == 0:
        try:
            report = export_model(engine.module, pruner.masks, args.output_dir, overwrite=args.overwrite,
                                  source=os.path.abspath(args.checkpoint_dir), tokenizer=tokenizer,
                                  extra={"oneshot": summary, "tag": info.tag, "step": info.step},
                                  params_before=params_before)
            summary["params_before"], summary["params_after"] = report["params_before"], report["params_after"]
            if args.report:
                if is_within(args.report, args.output_dir) and os.path.lexists(args.report):  # OUTPUT_DIR holds only the export's files now
                    raise OneShotError(f"--report {args.report!r} would replace a file of the export just "
                                       "written: the summary was not written; name another file")
                os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)  # may be in OUTPUT_DIR
                with open(args.report, "w") as f:
                    json.dump(json_safe(summary), f, indent=2, default=str, allow_nan=False)
        except Exception as err:  # every rank fails, not only rank 0
            error = err
    comm.raise_if_any(error, "export", OneShotError)
    return summary


def pruned_counts(pruner, kinds) -> Dict[str, Tuple[int, int]]:
    """Per structure type in ``kinds``: (live units the masks prune now, live units)."""
    return {kind: counts for kind, counts in pruner.pruned_units().items() if kind in kinds}


def already_pruned(pruner, args) -> Dict[str, float]:
    """Per structure type whose units pruned in training already exceed ``floor(sparsity * n)``:
    the fraction pruned (this run removes none of them). Not with ``per_layer``, whose layers
    below their own floor still lose units (``layers_past_target`` names the others)."""
    if args.scope == "per_layer":
        return {}
    return {kind: pruned / n for kind, (pruned, n) in pruned_counts(pruner, args.structures).items()
            if n and pruned > n_to_prune(args.sparsity, n)}


def layers_past_target(pruner, args) -> List[str]:
    """With ``--scope per_layer``: the blocks (``layers.1.mlp``) whose units pruned in training
    already exceed this layer's ``floor(sparsity * n)`` (the event prunes none of them back), so
    the result is not one width per layer; their live units only (an export's placeholders aside)."""
    if args.scope != "per_layer":
        return []
    kinds = set(args.structures)
    return [g.key for g in pruner.groups if enum_name(g.kind) in kinds and g.key not in pruner.placeholders
            and int((~pruner.masks[g.key]).sum()) > n_to_prune(args.sparsity, g.n_units)]


def shortfall(pruner, args) -> Dict[str, float]:
    """Per structure type whose pruned units fall short of ``floor(sparsity * n)`` under a global
    threshold (``min_units_per_layer`` held some back): the fraction reached. Counts, not float
    fractions; ``per_layer`` takes each layer's own floor, and keeps no minimum."""
    if args.scope == "per_layer" or args.min_units_per_layer == 0:
        return {}
    return {kind: pruned / n for kind, (pruned, n) in pruned_counts(pruner, args.structures).items()
            if n and pruned < n_to_prune(args.sparsity, n)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rank = launch_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with abort_job_on_error(unless=(OneShotError,)):  # under mpirun, a rank failing alone stops the job
            summary = run(args)
    except OneShotError as err:
        sys.stderr.write(f"error (rank {rank}): {err}\n")  # one write: ranks' lines do not run together
        sys.stderr.flush()
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        before = summary.get("ppl_before")
        ppl = (f"; validation perplexity {before:.3f} -> {summary['ppl_after']:.3f}" if before is not None else "")
        reached = summary["event"].get("sparsity", {})
        pruned = ", ".join(f"{reached.get(k, 0.0):.1%} of {k}" for k in args.structures)
        print(f"wrote {args.output_dir}: pruned {pruned} ({args.score}, compensation {args.compensation}), "
              f"parameters {summary.get('params_before', 0):,} -> {summary.get('params_after', 0):,}{ppl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
