#!/usr/bin/env python
"""Train (or fine-tune) a causal LM with DeepSpeed ZeRO and ds_bitter7 structured pruning.

Works under every launcher: ``deepspeed``, ``torchrun``, ``mpirun`` (rank discovery through
mpi4py) or plain ``python`` (one rank). Pruning follows the ``"bitter7"`` section of the DeepSpeed
config; without that section this is plain DeepSpeed training.

    torchrun --nproc_per_node 2 launch/train.py --config ds_configs/cpu_demo.json --demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import datasets
import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

try:
    import ds_bitter7
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ds_bitter7
from ds_bitter7 import cli, modeling
from ds_bitter7 import data as dsdata
from ds_bitter7.calibration import needs_stats
from ds_bitter7.checkpoint_files import checkpoint_problems
from ds_bitter7.cli import check_launch_args, exit_on_every_rank
from ds_bitter7.comm import Communicator, abort_job_on_error, init_distributed
from ds_bitter7.evaluation import perplexity_of, token_loss
from ds_bitter7.export import REPORT_FILE, json_safe
from ds_bitter7.modeling import model_mismatch, saved_model_config
from ds_bitter7.schedule import sparsity_reached
from ds_bitter7.state import CLIENT_KEY as PRUNER_STATE_KEY
from ds_bitter7.state import latest_tag, save_model_config
from ds_bitter7.zero_access import MissingOptimizerState

logger = logging.getLogger("train")

DEFAULTS = dict(model="tiny-gpt2", steps=1000, seq_len=256, eval_every=200, eval_batches=32,
                calibration_batches=8, save_every=0)
DEMO_DEFAULTS = dict(model="tiny-gpt2", steps=200, seq_len=64, eval_every=50, eval_batches=8,
                     calibration_batches=4, save_every=0)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="tiny-gpt2 | tiny-llama | local model dir | transformers config name (default: "
                   "tiny-gpt2, or with --resume the checkpoint's config.json)")
    p.add_argument("--model_overrides", default="{}", help="JSON dict set on the model config")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="builtin | local .txt/.md/.rst/.text/.json/.jsonl files or dirs | hub dataset name")
    p.add_argument("--data_config", help="configuration of a hub dataset (wikitext: e.g. wikitext-103-raw-v1)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one saved in the --resume folder, else in "
                   "a --model folder, else bytes, vocabulary 257)")
    p.add_argument("--config", help="DeepSpeed JSON config (same as --deepspeed_config)")
    p.add_argument("--steps", type=int, help="optimizer steps to train to")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--eval_every", type=int, help="validate every N optimizer steps (0: start/end)")
    p.add_argument("--eval_batches", type=int, help="validation batches per rank")
    p.add_argument("--calibration_batches", type=int, help="train-split batches for calibration")
    p.add_argument("--save_dir", help="DeepSpeed checkpoint folder (saved at the end)")
    p.add_argument("--save_every", type=int, help="also save every N steps (0: only at the end)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="resume from the latest checkpoint in this folder (default: --save_dir)")
    p.add_argument("--summary", help="write a JSON summary here (rank 0)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--demo", action="store_true", help="small, fast defaults for a CPU demo")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                   help="set by the deepspeed launcher")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    args.model_given = args.model is not None  # else, resuming, the checkpoint's own (its config.json)
    for key, value in (DEMO_DEFAULTS if args.demo else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    named = named_configs(sys.argv[1:] if argv is None else argv)  # argparse keeps a repeated option's last
    if len({os.path.realpath(c) for c in named}) > 1:
        p.error(f"{' and '.join(named)} name different configs: give one (the launch scripts pass CONFIG's "
                "as --config or --deepspeed_config: set CONFIG=... instead)")
    args.config = args.config or args.deepspeed_config
    if not args.config:
        p.error("a DeepSpeed config is required: --config or --deepspeed_config")
    if args.resume == "":
        args.resume = args.save_dir
    if args.resume is not None and not args.resume:
        p.error("--resume needs a folder or --save_dir")
    check_launch_args(p, args, (("steps", 0), ("seq_len", 2), ("eval_every", 0), ("eval_batches", 1),
                                ("calibration_batches", 0), ("save_every", 0), ("seed", 0)))
    return args


def path_problems(args, rank: int) -> List[str]:
    """What this rank's file system refuses in the arguments (``cli.path_problems``, a ``--resume``
    file, a ``--save_dir`` of another run's): made on every rank once the ranks have started."""
    problems = cli.path_problems(rank, args.summary, reads=[args.config, *args.data, args.tokenizer, args.model],
                                 output_dirs=[("--save_dir", args.save_dir)], checkpoints=[args.save_dir, args.resume],
                                 data=args.data)
    if args.resume and os.path.lexists(args.resume) and not os.path.isdir(args.resume):
        problems.append(f"--resume {args.resume!r} is a file, not a folder")
    elif args.resume and not os.path.lexists(args.resume):
        problems.append(f"--resume {args.resume!r} does not exist")
    return problems + [p for p in (save_dir_problem(args),) if p]


def named_configs(argv) -> list:
    """The files given as ``--config`` or ``--deepspeed_config`` (either form, each time given)."""
    out = []
    for i, token in enumerate(argv):
        for flag in ("--config", "--deepspeed_config"):
            if token == flag and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif token.startswith(flag + "="):
                out.append(token[len(flag) + 1:])
    return out


def rank0_first(fn, rank: int):
    """Run ``fn`` on rank 0, then on the others (they reuse rank 0's caches). Collective: an error
    on any rank stops every rank (a node whose data files differ must not leave the others waiting)."""
    comm = Communicator()
    out = comm.call("building the data on rank 0", fn if rank == 0 else lambda: None)
    return comm.call("building the data", (lambda: out) if rank == 0 else fn)


def build_data(args, tokenizer, rank: int):
    if args.data == [dsdata.BUILTIN] and args.data_config is None:  # in memory: only the corpus file cache is shared
        train, val = rank0_first(lambda: dsdata.load_text_datasets(args.data, seed=args.seed), rank)
        return (dsdata.chunk_dataset(train, tokenizer, args.seq_len, what="the built-in train split"),
                dsdata.chunk_dataset(val, tokenizer, args.seq_len, what="the built-in validation split"))
    return rank0_first(lambda: dsdata.build_lm_datasets(args.data, tokenizer, args.seq_len, seed=args.seed,
                                                        hub_config=args.data_config), rank)


def evaluate(engine, loader, n_batches: int) -> Tuple[float, float]:
    """(mean token loss, perplexity) over ``n_batches`` per rank, token-weighted over all ranks. Collective."""
    loss = token_loss(engine, loader, n_batches, Communicator())
    return loss, perplexity_of(loss)


def sparsity_by_kind(pruner) -> Dict[str, float]:
    """Fraction of units removed, per structure kind, from the pruner's report."""
    agg: Dict[str, List[int]] = {}
    for row in pruner.sparsity_report():
        kept_total = agg.setdefault(row["kind"], [0, 0])
        kept_total[0] += row["units_kept"]
        kept_total[1] += row["units_total"]
    return {k: 1.0 - kept / max(total, 1) for k, (kept, total) in agg.items()}


def params_kept(pruner) -> Tuple[int, int]:
    rows = pruner.sparsity_report()
    return sum(r["params_kept"] for r in rows), sum(r["params_total"] for r in rows)


def write_monitor(engine, events: List[Tuple[str, float, int]]) -> None:
    """Send events to DeepSpeed's own monitor (csv_monitor / tensorboard / wandb sections)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled and events:
        monitor.write_events(events)


def pruning_events(pruner, seen_step: Optional[int]) -> Tuple[List[Tuple[str, float, int]], Optional[int]]:
    """Monitor events for a pruning event not yet reported."""
    event = pruner.last_event if pruner is not None else None
    if not event or event["step"] == seen_step:
        return [], seen_step
    step = event["step"]
    out = [(f"Bitter7/sparsity/{k}", float(v), step) for k, v in event.get("sparsity", {}).items()]
    for k, v in event.get("thresholds", {}).items():  # unstructured: one threshold per group
        values = v if isinstance(v, list) else [v]
        out += [(f"Bitter7/threshold/{k}" + (f"/{i}" if len(values) > 1 else ""), float(x), step)
                for i, x in enumerate(values)]
    out.append(("Bitter7/event_seconds", float(event.get("seconds", 0.0)), step))
    return out, step


def save(engine, tokenizer, save_dir: str, step: int, extra: Dict[str, Any]) -> None:
    """DeepSpeed checkpoint (ds_bitter7 adds the pruner's state itself), refused on every rank when
    the model's weights are not finite: 'latest' would name it, over the last good one. Collective."""
    bad = [name for name, p in engine.module.named_parameters() if not bool(torch.isfinite(p).all())]
    problem = (f"not saving step {step} in {save_dir!r}: the model's weights hold NaN or Inf ({', '.join(bad[:3])}"
               f"{' and more' if len(bad) > 3 else ''}): training diverged, or the checkpoint it resumed from has "
               f"damaged tensors; 'latest' still names {latest_tag(save_dir)!r}") if bad else None
    exit_on_every_rank(problem, elsewhere=f"another rank does not save step {step}")
    client = dict(extra, step=step)
    engine.save_checkpoint(save_dir, tag=f"global_step{step}", client_state=client)
    if engine.global_rank == 0:  # export and one-shot read the model config and tokenizer beside the checkpoints
        save_model_config(engine.module, save_dir, replace=True)  # a --model's stop tokens too: the export keeps them
        if not isinstance(tokenizer, dsdata.ByteTokenizer):  # bytes: what they use when no files are there
            tokenizer.save_pretrained(save_dir)


def write_json_atomic(path: str, obj: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # strict JSON: no step taken leaves a nan train loss (null)
        json.dump(json_safe(obj), f, indent=2, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)


def save_dir_problem(args) -> Optional[str]:
    """Why this run must not save into ``--save_dir``: it holds another run's checkpoints (its
    ``latest`` and ``config.json`` would be replaced, and its older tags would no longer match)."""
    if not args.save_dir or (args.resume and os.path.realpath(args.resume) == os.path.realpath(args.save_dir)):
        return None
    tag = latest_tag(args.save_dir)
    if tag is None:
        model = [n for n in ("config.json", REPORT_FILE, "model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(args.save_dir, n))]
        if model:  # a model or an export (train.py writes config.json beside its checkpoints only)
            return (f"--save_dir {args.save_dir!r} holds a model ({model[0]}) and no checkpoint: its "
                    "config.json would be replaced; choose another --save_dir")
        return None
    return (f"--save_dir {args.save_dir!r} already holds checkpoints (latest: {tag}): continue that run with "
            "--resume, or delete the folder, or choose another --save_dir")


def train(args) -> Dict[str, Any]:
    world_size, rank = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if rank != 0:
        datasets.disable_progress_bars()
    deepspeed.runtime.utils.set_random_seed(args.seed)
    comm = Communicator()
    cli.exit_on_path_problems(lambda: path_problems(args, rank),
                              ("--save_dir", args.save_dir) if args.save_dir else None)
    ds_config, bitter7 = cli.read_ds_config(args.config, "launch/train.py --config")  # fails in a second
    resume_model = args.resume is not None and not args.model_given
    if resume_model and not comm.any(not os.path.isfile(os.path.join(args.resume, "config.json"))):
        args.model = args.resume  # the run's own model, its --model_overrides included
    else:
        resume_model = False
    if args.tokenizer is None:  # the run's own (saved beside its checkpoints) or the model folder's, as one-shot
        args.tokenizer = dsdata.tokenizer_beside(args.resume) or dsdata.tokenizer_beside(args.model)
        if not comm.same(str(args.tokenizer)):  # a node without the saved files would tokenize bytes
            raise SystemExit(f"the ranks find different tokenizers beside --resume / --model (this rank: "
                             f"{args.tokenizer or 'bytes'}): a node misses the saved files; pass --tokenizer")
    # collective: a tokenizer or model folder missing on one node stops every rank
    tokenizer = cli.build_or_exit("loading the tokenizer", dsdata.get_tokenizer, args.tokenizer)
    # the model before the data: a wrong --model or --model_overrides fails before a long tokenization
    saved, problem = {}, None
    try:
        saved = saved_model_config(args.resume) if args.resume else {}
    except ValueError as err:
        problem = f"cannot resume from {args.resume!r}: {err}"
    exit_on_every_rank(problem, elsewhere=f"another rank cannot read the model config in {args.resume!r}")
    # the built-ins' position table: the checkpoint's where this --seq_len fits it (a resume may change it)
    positions = next((saved[k] for k in ("n_positions", "max_position_embeddings")
                      if isinstance(saved.get(k), int) and saved[k] >= args.seq_len), max(args.seq_len, 256))
    model = cli.build_or_exit("building the model", lambda: modeling.build_model(
        args.model, dsdata.tokenizer_vocab_size(tokenizer), max_positions=positions, seed=args.seed,
        overrides=args.model_overrides, eos_token_id=dsdata.eos_id(tokenizer), resuming=resume_model))
    problem = None
    mismatch = model_mismatch(saved, model.config)
    if mismatch:  # DeepSpeed's loading would fail on every rank with a size-mismatch traceback
        problem = (f"cannot resume from {args.resume!r}: its model (config.json) has {mismatch}: pass the "
                   "training run's --model, --model_overrides and --tokenizer (and a --seq_len within its positions)")
    elif (args.tokenizer is None and os.path.isdir(args.model) and modeling.has_weights(args.model)
            and model.config.vocab_size > dsdata.BYTE_MODEL_VOCAB):  # trained weights fed the wrong ids
        problem = (f"--model {args.model!r} has trained weights for {model.config.vocab_size} token ids and no "
                   "tokenizer files beside them: the byte tokenizer would feed it ids that mean other text; "
                   "pass its tokenizer with --tokenizer DIR")
    problem = problem or modeling.seq_len_problem(args.seq_len, model.config)
    exit_on_every_rank(problem, elsewhere="another rank cannot build the model to resume")
    train_blocks, val_blocks = cli.build_or_exit("building the data", build_data, args, tokenizer, rank)
    logger.info("data: %d train / %d validation blocks of %d tokens, %d ranks",
                len(train_blocks), len(val_blocks), args.seq_len, world_size)
    device = deepspeed.accelerator.get_accelerator().current_device_name()
    calib = None
    if args.calibration_batches > 0 and bitter7.enabled and needs_stats(bitter7):  # else no batch is read
        bs = ds_config.get("train_micro_batch_size_per_gpu") or max(1, ds_config.get("train_batch_size", 1) // (
            ds_config.get("gradient_accumulation_steps", 1) * world_size))  # as DeepSpeed derives it
        calib = [{k: v.to(device) for k, v in b.items()}
                 for b in dsdata.calibration_batches(train_blocks, bs, args.calibration_batches, args.seed)]
    try:
        engine, _, _, _ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                                config=ds_config, calibration_data=calib)
    except ValueError as err:
        if calib is None and "needs calibration data" in str(err):  # say it in this script's terms
            raise SystemExit(f"{err}\n(launch/train.py: pass --calibration_batches N > 0)") from None
        raise
    pruner = ds_bitter7.get_pruner(engine)
    return run_loop(args, engine, pruner, tokenizer, train_blocks, val_blocks, world_size, rank)


def data_record(args) -> str:
    """What ``--data`` (and ``--data_config``) named, as the checkpoint records it: local paths resolved."""
    names = [os.path.realpath(d) if os.path.exists(d) else d for d in args.data]
    return " ".join(names) + (f" ({args.data_config})" if args.data_config else "")


def stale_universal(folder: str) -> Optional[str]:
    """Why loading ``folder``'s universal checkpoint would go back in time: its ``latest`` names a
    later step than ``latest_universal`` (the run saved on after resuming from the conversion), or None."""
    def step_of(name: str) -> Optional[int]:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                found = re.search(r"(\d+)", f.read())
        except OSError:
            return None
        return int(found.group(1)) if found else None

    latest, universal = step_of("latest"), step_of("latest_universal")
    if latest is None or universal is None or latest <= universal:
        return None
    return (f"the config loads the universal checkpoint (latest_universal, step {universal}), but this run has "
            f"saved on since (latest, step {latest}): remove \"checkpoint\": {{\"load_universal\": true}} from the "
            "config to continue from there (it is only for the first resume at a new world size)")


def resume(args, engine, pruner, world_size: int, rank: int) -> Tuple[int, Optional[float], Optional[float], int]:
    """Load ``--resume`` into the engine (and its pruner), after checking it on every rank; returns
    the checkpoint's (step, start perplexity, start loss, step of that perplexity), with warnings
    where this run's arguments differ from the checkpoint's run."""
    # a missing or truncated rank file fails every rank here, not one rank inside DeepSpeed's
    # loading while the others wait in its collectives
    universal = bool(engine.load_universal_checkpoint())  # another layout: DeepSpeed checks it
    if universal:
        problems = [p for p in (stale_universal(args.resume),) if p]
    elif os.path.isfile(os.path.join(args.resume, "latest")):
        problems = checkpoint_problems(args.resume, world_size=world_size, zero_stage=engine.zero_optimization_stage(),
                                       bf16=engine.bfloat16_enabled())
    else:  # said on every rank: a node that sees no checkpoint there must not fail alone
        problems = ["no DeepSpeed checkpoint in it (no 'latest' file)"]
    if Communicator().any(bool(problems)):
        why = "; ".join(problems) or "another rank cannot read it (see its error)"
        raise SystemExit(f"cannot resume from {args.resume!r}: {why}")
    path, client = engine.load_checkpoint(args.resume)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint to resume in {args.resume}")
    client = client or {}
    if rank == 0 and pruner is None and client.get(PRUNER_STATE_KEY) is not None:
        logger.warning("%s carries ds_bitter7 pruner state but this run's config has no bitter7 section: "
                       "its masks are not kept from here on and its checkpoints will not carry them "
                       "(export needs them); add the checkpoint's bitter7 section to --config", path)
    start, ppl_start, loss_start = client.get("step", engine.global_steps), client.get("ppl_start"), client.get("loss_start")
    own = args.tokenizer is not None and os.path.realpath(args.tokenizer) == os.path.realpath(args.resume)
    refused, warned = (None, None) if own else \
        dsdata.tokenizer_change(client.get("tokenizer"), args.tokenizer or dsdata.BYTES)  # own: saved beside it
    if refused:  # the same client state on every rank: every rank stops
        raise SystemExit(f"{path}: {refused}")
    if rank == 0 and warned:
        logger.warning("%s: %s", path, warned)
    ppl_start_step = client.get("ppl_start_step", 0)
    logger.info("resumed from %s at step %d", path, start)
    if rank == 0 and args.steps <= start:
        logger.warning("--steps %d is not past the checkpoint's step %d: no step is taken; the resumed model "
                       "is evaluated as it is", args.steps, start)
    if rank == 0 and ppl_start is not None and client.get("seq_len") not in (None, args.seq_len):
        logger.warning("the step-%d perplexity in the report is the checkpoint's, measured with --seq_len %s, "
                       "not this run's %d", ppl_start_step, client.get("seq_len"), args.seq_len)
    data = {"data": data_record(args), "seed": args.seed}
    changed = [k for k, v in data.items() if client.get(k) not in (None, v)]
    if rank == 0 and changed:  # another split: validation documents may have been trained on
        logger.warning("the checkpoint's run trained with %s; this one has %s: the data order differs, and so "
                       "may the train/validation split (validation text may have been trained on); the step-%d "
                       "perplexity in the report was measured on the checkpoint's", ", ".join(f"--{k} {client[k]}" for k in changed),
                       ", ".join(f"--{k} {data[k]}" for k in changed), ppl_start_step)
    if rank == 0 and not args.save_dir:
        logger.warning("no --save_dir: this resumed run's checkpoints are not saved (add --save_dir, for "
                       "instance %s)", args.resume)
    return start, ppl_start, loss_start, ppl_start_step


def run_loop(args, engine, pruner, tokenizer, train_blocks, val_blocks, world_size: int,
             rank: int) -> Dict[str, Any]:
    mb, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    train_loader = dsdata.make_dataloader(train_blocks, mb, shuffle=True, seed=args.seed)
    val_loader = dsdata.eval_dataloader(val_blocks, mb)
    start, ppl_start, loss_start, ppl_start_step = 0, None, None, 0
    if args.resume:
        start, ppl_start, loss_start, ppl_start_step = resume(args, engine, pruner, world_size, rank)
    end_step = pruner.config.schedule.end_step if pruner is not None else 0
    if rank == 0 and start < args.steps < end_step:
        logger.warning("--steps %d ends before schedule.end_step %d: the run stops at sparsity %s of "
                       "target_sparsity %s", args.steps, end_step, sparsity_reached(pruner.config, args.steps),
                       pruner.config.target_sparsity)
    if ppl_start is None:  # the run's first evaluation (kept in its checkpoints)
        ppl_start_step = start
        loss_start, ppl_start = evaluate(engine, val_loader, args.eval_batches)
        logger.info("step %d: validation loss %.4f, perplexity %.2f", start, loss_start, ppl_start)
        write_monitor(engine, [("Val/ppl", ppl_start, start), ("Val/loss", loss_start, start)])
    batches = dsdata.iterate_forever(train_loader, start_batch=start * ga)
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    t0, step, loss = time.time(), start, float("nan")
    seen_event = pruner.last_event["step"] if pruner is not None and pruner.last_event else None  # the checkpoint's
    val_loss, ppl = loss_start, ppl_start
    extra = {"ppl_start": ppl_start, "ppl_start_step": ppl_start_step, "loss_start": loss_start,
             "seq_len": args.seq_len, "tokenizer": args.tokenizer or dsdata.BYTES,  # one-shot reads these
             "data": data_record(args), "seed": args.seed}
    while step < args.steps:
        losses = []
        for _ in range(ga):
            ids = next(batches)["input_ids"].to(engine.device)
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        step += 1
        loss = sum(losses) / len(losses)
        events, seen_event = pruning_events(pruner, seen_event)
        events.append(("Train/loss", loss, step))
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            val_loss, ppl = evaluate(engine, val_loader, args.eval_batches)
            logger.info("step %d: validation loss %.4f, perplexity %.2f", step, val_loss, ppl)
            events += [("Val/ppl", ppl, step), ("Val/loss", val_loss, step)]
        write_monitor(engine, events)
        bar.update(1)
        if rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", **({k: f"{v:.2f}" for k, v in sparsity_by_kind(pruner).items()}
                                                    if seen_event is not None else {}))
        if args.save_dir and args.save_every and step % args.save_every == 0 and step < args.steps:
            save(engine, tokenizer, args.save_dir, step, extra)
    bar.close()
    seconds = time.time() - t0
    if step != ppl_start_step:  # not the model evaluated above (a resume taking no step is evaluated too)
        val_loss, ppl = evaluate(engine, val_loader, args.eval_batches)
        write_monitor(engine, [("Val/ppl", ppl, step), ("Val/loss", val_loss, step)])
    if args.save_dir and (step > start or start == 0):  # a resume that took no step keeps its checkpoint
        save(engine, tokenizer, args.save_dir, step, extra)
    summary = {"steps": step, "start_step": start, "world_size": world_size, "seconds": seconds,
               "ppl_start": ppl_start, "ppl_start_step": ppl_start_step, "loss_start": loss_start,
               "ppl_final": ppl, "loss_final": val_loss,
               "train_loss_final": loss, "model": args.model, "config": os.path.abspath(args.config),
               "seq_len": args.seq_len, "pruning": pruner is not None, "sparsity": {},
               "params_kept": None, "params_total": None, "layers": []}
    if pruner is not None:
        summary["sparsity"] = sparsity_by_kind(pruner)
        summary["params_kept"], summary["params_total"] = params_kept(pruner)
        summary["layers"] = pruner.sparsity_report()
    if rank == 0:
        report(summary, pruner)
        if args.summary:
            write_json_atomic(args.summary, summary)
    dist.barrier()
    return summary


def report(summary: Dict[str, Any], pruner) -> None:
    """The end-of-run report (rank 0, to stdout)."""
    if pruner is not None:
        print(pruner.format_report())
    start = f"step {summary['ppl_start_step']}" + (" (before pruning)" if summary["ppl_start_step"] == 0 else "")
    print(f"validation perplexity: {summary['ppl_start']:.2f} at {start} -> {summary['ppl_final']:.2f} "
          f"at step {summary['steps']}")
    if summary["sparsity"]:
        print("units removed: " + ", ".join(f"{k} {v:.1%}" for k, v in summary["sparsity"].items()))
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    with abort_job_on_error():  # under mpirun, a rank that fails alone stops the job
        try:
            train(args)  # ends with a barrier: no rank is still using the group
        except MissingOptimizerState as err:  # no exp_avg_sq after the first step (not an Adam optimizer)
            if not getattr(err, "on_every_rank", False):  # raised by this rank alone: a traceback, MPI aborts
                raise
            raise SystemExit(f"launch/train.py: {err}") from None
    if dist.is_initialized():
        dist.destroy_process_group()  # a clean exit, not a communicator torn down at interpreter exit


if __name__ == "__main__":
    main()
