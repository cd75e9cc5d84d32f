#!/usr/bin/env python
"""One-shot pruning quality: scores x compensation on a dense GPT-2 trained with ZeRO-2 on 2 ranks.

Per seed, the reference workload (tiny GPT-2 from scratch on the built-in corpus, ZeRO-2, 2 ranks,
``launch/train.py --save_dir``) is trained dense once. Then one ``torchrun`` job of 2 ranks loads
that checkpoint WITH its optimizer state again for every cell of the matrix (the loading, data
and perplexity code of ``ds_bitter7.oneshot``), prunes the MLP neurons in ONE event
(``pruner.prune_to``) with each score, each compensation (none, mean, least squares) and each
sparsity (50%, 75%), and measures validation perplexity. Calibration uses the TRAIN split only
(``--num_batches`` batches per rank); perplexity the validation split.

Scores (rows): magnitude, bitter7, fisher, bitter7_variance (the library's scorers, one raw
global threshold: ``scope: global``), bitter7 with ``scope: standardized`` (per-layer z-scores,
then one global threshold), and FLAP's fluctuation (An et al. 2024): per neuron
``Var(x_i) * ||W_next[i, :]||^2``, the variance of the next layer's input feature times the squared
norm of its weights, with FLAP's per-layer standardisation (``scope: standardized``, the library's)
and, for comparison, raw: the library's ``score: fluctuation``. FLAP's own bias compensation is
the ``mean`` mode. Last, ``score: obs``: the greedy order of a structured Optimal Brain Surgeon on
each next layer's input covariance (``ds_bitter7/obs.py``), the selection that least squares is
the refit of, and ``score: bitter7_obs``: the same greedy with each output's error weighted by
Adam's second moment of the next layer (the loss's sensitivity to that output).

``--scope per_layer``: the rows of one global threshold prune every layer by the same fraction
instead (``scope: per_layer``, the same allocation for every score); the standardised rows, which
have an allocation of their own, are left out. Writes ``benchmarks/results/oneshot[_quick][_per_layer].{json,md,png}``.

    python benchmarks/oneshot.py --quick     # 1 seed, 800 training steps (about 5 min on 2 CPU cores)
    python benchmarks/oneshot.py             # 3 seeds, 800 training steps
    python benchmarks/oneshot.py --workdir /tmp/oneshot   # keep (and reuse) the dense checkpoints
    python benchmarks/oneshot.py --workdir /tmp/oneshot --rows bitter7_obs   # prune only these rows;
        # the other rows' cells come from that workdir's earlier run (same arguments)
    python benchmarks/oneshot.py --workdir /tmp/oneshot --scope per_layer   # the same layer fraction
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

from _common import ROOT, reference_ds_config, run_logged

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# row name -> (the library's score, scope)
ROWS = {"magnitude": ("magnitude", "global"), "bitter7": ("bitter7", "global"),
        "bitter7 standardized": ("bitter7", "standardized"), "fisher": ("fisher", "global"),
        "bitter7_variance": ("bitter7_variance", "global"), "flap": ("fluctuation", "standardized"),
        "flap raw": ("fluctuation", "global"), "obs": ("obs", "global"),
        "bitter7_obs": ("bitter7_obs", "global")}
SCORES = list(ROWS)
SCOPES = ("global", "per_layer")
COMPENSATIONS = ["none", "mean", "least_squares"]
SPARSITIES = [0.5, 0.75]
QUICK = {"steps": 800, "seeds": [1]}
# what a cell depends on that the dense perplexity does not show, with its default: cells saved
# before they recorded these were pruned with the defaults (every earlier run used them)
PRUNING_ARGS = {"num_batches": 8, "ridge": 1e-3}
FULL = {"steps": 800, "seeds": [1, 2, 3]}


def rows_for(scope: str) -> Dict[str, tuple]:
    """The rows of a run: ``ROWS``, or with ``per_layer`` the global-threshold rows pruned layer by
    layer (the standardised rows keep an allocation of their own and are left out)."""
    if scope == "global":
        return dict(ROWS)
    return {row: (score, scope) for row, (score, row_scope) in ROWS.items() if row_scope == "global"}


def cells_file(workdir: str, seed: int, scope: str) -> str:
    """A seed's cells in ``workdir``: one file per scope (``global`` keeps the older name)."""
    return os.path.join(workdir, f"cells_{seed}.json" if scope == "global" else f"cells_{seed}_{scope}.json")


def dense_folder(workdir: str, seed: int) -> str:
    """A seed's dense checkpoint folder in ``workdir`` (``launch/train.py --save_dir``)."""
    return os.path.join(workdir, f"dense_{seed}")


def train_dense(seed: int, args, workdir: str) -> str:
    """Train once per seed with launch/train.py; returns the checkpoint folder (with config.json).

    A finished checkpoint already in ``workdir`` (``--workdir``, same arguments) is reused.
    """
    folder = dense_folder(workdir, seed)
    if os.path.exists(os.path.join(folder, "latest")) and os.path.exists(os.path.join(folder, "config.json")):
        return folder
    cfg = os.path.join(workdir, f"dense_{seed}.json")
    with open(cfg, "w", encoding="utf-8") as f:
        json.dump(reference_ds_config(args.steps, args.lr, args.micro_batch), f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port),
           os.path.join(ROOT, "launch", "train.py"), "--config", cfg, "--model", "tiny-gpt2",
           "--steps", str(args.steps), "--seq_len", str(args.seq_len), "--eval_every", "0",
           "--eval_batches", "2", "--calibration_batches", "0", "--seed", str(seed), "--save_dir", folder]
    run_logged(cmd, folder + "_train.log", args.run_timeout, f"dense training, seed {seed}")
    return folder  # launch/train.py saved config.json beside the checkpoint


def prune_matrix(checkpoint: str, seed: int, args, workdir: str) -> List[Dict]:
    """Every (score, compensation, sparsity) cell of ``args.rows`` on 2 ranks, with the other rows'
    cells from the workdir's earlier ``cells_file`` of this scope; returns (and saves) all of them."""
    out = cells_file(workdir, seed, args.scope)
    every = list(rows_for(args.scope))
    kept = []
    if set(args.rows) != set(every):
        with open(out, encoding="utf-8") as f:
            kept = [c for c in json.load(f) if c["score"] not in args.rows]
        other = {f"--{k} {c.get(k, default)}" for c in kept for k, default in PRUNING_ARGS.items()
                 if c.get(k, default) != getattr(args, k)}
        if other:
            raise SystemExit(f"--rows: {out}'s other rows were pruned with {', '.join(sorted(other))}, "
                             "not this run's: prune every row again (leave out --rows)")
        missing = [r for r in every if r not in args.rows and sum(c["score"] == r for c in kept)
                   != len(COMPENSATIONS) * len(SPARSITIES)]
        if missing:
            raise SystemExit(f"--rows: {out} lacks cells of rows {missing}: add them to --rows")
    new = out + ".new"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port),
           os.path.abspath(__file__), "--worker", checkpoint, new, "--seq_len", str(args.seq_len),
           "--micro_batch", str(args.micro_batch), "--num_batches", str(args.num_batches),
           "--eval_batches", str(args.eval_batches), "--seed", str(seed), "--ridge", str(args.ridge),
           "--scope", args.scope, "--rows", *args.rows]
    run_logged(cmd, out[:-len(".json")] + ".log", args.run_timeout, f"one-shot cells, seed {seed}")
    with open(new, encoding="utf-8") as f:
        fresh = json.load(f)
    if kept and kept[0]["dense_ppl"] != fresh[0]["dense_ppl"]:  # another checkpoint or validation setup
        raise SystemExit(f"--rows: dense perplexity {fresh[0]['dense_ppl']} differs from {out}'s "
                         f"{kept[0]['dense_ppl']}: the earlier cells are not of this run's arguments")
    cells = kept + fresh
    with open(out, "w", encoding="utf-8") as f:
        json.dump(cells, f, indent=2)
    os.remove(new)
    return cells


# --------------------------------------------------------------------------- the worker (2 ranks)
def worker(argv: List[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import ds_bitter7
    from ds_bitter7 import data as dsdata
    from ds_bitter7 import oneshot, oneshot_args
    from ds_bitter7.checkpoint_loading import build_engine, inspect_checkpoint
    from ds_bitter7.comm import Communicator, init_distributed
    from ds_bitter7.config import parse_config
    from ds_bitter7.evaluation import perplexity
    from ds_bitter7.export import load_config

    p = argparse.ArgumentParser()
    for name, typ in (("--seq_len", int), ("--micro_batch", int), ("--num_batches", int), ("--eval_batches", int),
                      ("--seed", int), ("--ridge", float)):
        p.add_argument(name, type=typ)
    p.add_argument("--scope", choices=SCOPES)
    p.add_argument("--rows", nargs="+", choices=SCORES)
    p.add_argument("checkpoint")
    p.add_argument("out")
    a = p.parse_args(argv)
    init_distributed()
    comm = Communicator()
    torch.set_num_threads(1)
    info = inspect_checkpoint(a.checkpoint, None)
    config, _ = load_config(a.checkpoint)
    tok = dsdata.get_tokenizer(None)
    base = oneshot_args.parse_args([a.checkpoint, a.out + ".tmp", "--sparsity", "0", "--validation", "builtin",
                               "--batch_size", str(a.micro_batch), "--seq_len", str(a.seq_len), "--num_batches",
                               str(a.num_batches), "--seed", str(a.seed), "--ridge", str(a.ridge)])  # the defaults
    calib = oneshot.calibration_data(base, tok)  # TRAIN split
    val = oneshot.validation_loader(base, tok)
    rows, dense = [], None
    for sparsity in SPARSITIES:
        for row, (score, scope) in rows_for(a.scope).items():
            if row not in a.rows:
                continue
            for comp in COMPENSATIONS:
                t0 = time.perf_counter()
                args = argparse.Namespace(**{**vars(base), "scope": scope, "sparsity": sparsity,
                                             "compensation": comp, "score": score})
                cfg = parse_config({"bitter7": oneshot_args.bitter7_section(args)})
                torch.manual_seed(a.seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                engine = build_engine(args, info, model, comm)
                if dense is None:
                    dense = perplexity(engine.module, val, a.eval_batches, comm)
                pruner = ds_bitter7.attach(engine, cfg, calib)
                event = pruner.prune_to(sparsity)
                ppl = perplexity(engine.module, val, a.eval_batches, comm)
                rows.append({"seed": a.seed, "score": row, "scope": scope, "compensation": comp, "sparsity": sparsity,
                             "ppl": ppl, "dense_ppl": dense, "num_batches": a.num_batches, "ridge": a.ridge,
                             "event_seconds": event["seconds"],
                             "event_bytes": event["bytes"], "compensation_info": event.get("compensation"),
                             "units_kept": {r["key"]: r["units_kept"] for r in pruner.sparsity_report()},
                             "seconds": time.perf_counter() - t0})
                if comm.rank == 0:
                    print(f"{row:>20} {comp:>13} {sparsity:.2f}: ppl {ppl:.3f} (dense {dense:.3f})", flush=True)
                del engine, pruner, model
                gc.collect()
    if comm.rank == 0:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    comm.any(False)  # rank 0 has written the file


# --------------------------------------------------------------------------- report
def summarise(cells: List[Dict]) -> List[Dict]:
    rows = []
    dense = [c["dense_ppl"] for c in {c["seed"]: c for c in cells}.values()]
    for sparsity in SPARSITIES:
        for score in SCORES:
            for comp in COMPENSATIONS:
                v = [c["ppl"] for c in cells if (c["score"], c["compensation"], c["sparsity"]) == (score, comp, sparsity)]
                if not v:
                    continue
                rows.append({"sparsity": sparsity, "score": score, "compensation": comp,
                             "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                             "min": min(v), "max": max(v), "n": len(v),
                             "vs_dense": statistics.fmean(v) / statistics.fmean(dense)})
    return rows


def present(rows: List[Dict]) -> List[str]:
    """The rows (scores) these results hold, in table order (older results lack some)."""
    return [s for s in SCORES if any(r["score"] == s for r in rows)]


def _cell(rows, sparsity, score, comp) -> Optional[float]:
    return next((r["mean"] for r in rows if (r["sparsity"], r["score"], r["compensation"]) == (sparsity, score, comp)), None)


def targets(rows: List[Dict], dense: float) -> List[Dict]:
    s = 0.75
    out = []
    b7, mag = _cell(rows, s, "bitter7", "none"), _cell(rows, s, "magnitude", "none")
    out.append({"target": "75%: bitter7 (no comp.) >= 20% lower ppl than magnitude (no comp.)",
                "value": f"{1 - b7 / mag:+.1%} lower", "met": 1 - b7 / mag >= 0.20})
    for score in present(rows):
        ls, mean = _cell(rows, s, score, "least_squares"), _cell(rows, s, score, "mean")
        value = f"{1 - ls / mean:+.1%} lower"
        if 0.85 * mean < dense:  # the target asks for a perplexity below the dense model's
            value += f" (15% below mean is {0.85 * mean:.2f}, under dense {dense:.2f})"
        out.append({"target": f"75%: {score}: least squares >= 15% lower ppl than mean",
                    "value": value, "met": 1 - ls / mean >= 0.15})
    out.append({"target": "75%: increase over dense, magnitude / bitter7, no comp. (seed: about 2x; informative)",
                "value": f"{(mag - dense) / (b7 - dense):.2f}x ({mag - dense:+.2f} vs {b7 - dense:+.2f})",
                "met": (mag - dense) >= 2 * (b7 - dense)})
    best = min((r for r in rows if r["sparsity"] == s), key=lambda r: r["mean"])
    out.append({"target": "75%: best cell within 15% of dense",
                "value": f"{best['score']} + {best['compensation']}: {best['mean'] / dense - 1:+.1%} vs dense",
                "met": best["mean"] <= 1.15 * dense})
    return out


def markdown(rows: List[Dict], checks: List[Dict], info: Dict) -> str:
    scope = info.get("scope", "global")
    allocation = ("one global threshold per structure type, except the standardized rows (per-layer z-scores, "
                  "then one threshold)" if scope == "global" else
                  "every layer pruned by the same fraction (`scope: per_layer`) for every score")
    lines = ["# One-shot pruning: score x compensation" + ("" if scope == "global" else f" ({scope})"), "",
             f"Command: `{info['command']}`  ", f"Dense validation perplexity: **{info['dense']:.3f}** "
             f"(mean of {len(info['seeds'])} seed(s); tiny GPT-2 trained {info['steps']} steps, ZeRO-2, 2 ranks). "
             f"MLP neurons pruned in one event; allocation: {allocation}; "
             f"calibration: {info['num_batches']} train-split batches per rank; "
             f"wall time {info['seconds'] / 60:.1f} min on {info['nproc']} CPU cores"
             + (f" (dense checkpoints of seeds {info['reused_seeds']} reused from `--workdir`, trained by an "
                "earlier invocation with the same arguments: "
                + ("the time is pruning only)." if set(info["reused_seeds"]) >= set(info["seeds"])
                   else "the time is their pruning and the other seeds' training and pruning).")
                if info.get("reused_seeds") else ".")
             + (f" Rows pruned by this invocation: {', '.join(info['rows'])}; the other rows' cells are from an "
                "earlier run in that `--workdir` (same dense checkpoints; each seed's dense perplexity checked equal)."
                if set(info.get("rows", SCORES)) != set(rows_for(scope)) else ""), ""]
    for s in SPARSITIES:
        lines += [f"## {s:.0%} of MLP neurons removed", "",
                  "| score | none | mean | least squares |", "|---|---:|---:|---:|"]
        for score in present(rows):
            cells = []
            for comp in COMPENSATIONS:
                r = next(r for r in rows if (r["sparsity"], r["score"], r["compensation"]) == (s, score, comp))
                spread = f" ± {r['std']:.2f}" if r["n"] > 1 else ""
                cells.append(f"{r['mean']:.2f}{spread} ({r['vs_dense']:.2f}x)")
            lines.append(f"| {score} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Cells: validation perplexity (ratio to dense).", "", "## Targets", "", "| target | value | met |",
              "|---|---|---|"]
    lines += [f"| {c['target']} | {c['value']} | {'yes' if c['met'] else 'NO'} |" for c in checks]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], dense: float, path: str, command: str, nproc: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPARSITIES), figsize=(12, 4.8), sharey=False)
    width = 0.25
    for ax, s in zip(axes, SPARSITIES):
        for j, comp in enumerate(COMPENSATIONS):
            vals = [_cell(rows, s, score, comp) for score in present(rows)]
            ax.bar([i + (j - 1) * width for i in range(len(vals))], vals, width, label=comp)
        ax.axhline(dense, color="k", linestyle="--", label="dense")
        ax.set_xticks(range(len(present(rows))), present(rows), rotation=30, ha="right")
        low = min([v for score in present(rows) for comp in COMPENSATIONS
                   if (v := _cell(rows, s, score, comp)) is not None] + [dense])
        ax.set_ylim(bottom=0.98 * low)  # linear: the differences are small next to the perplexity
        ax.set_title(f"{s:.0%} of MLP neurons, one shot")
        ax.set_ylabel("validation perplexity")
    axes[0].legend()
    fig.text(0.01, 0.005, f"{command}; {nproc} CPU cores", fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps, seeds {QUICK['seeds']}")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--num_batches", type=int, default=PRUNING_ARGS["num_batches"],
                   help="calibration batches per rank (train split)")
    p.add_argument("--eval_batches", type=int, default=16, help="validation batches per rank")
    p.add_argument("--ridge", type=float, default=PRUNING_ARGS["ridge"])
    p.add_argument("--port", type=int, default=29741)
    p.add_argument("--run_timeout", type=int, default=3600)
    p.add_argument("--workdir", help="keep checkpoints and logs here (default: a temp dir, removed)")
    p.add_argument("--out", help="output name under benchmarks/results (default: oneshot or oneshot_quick, "
                   "with _per_layer for --scope per_layer)")
    p.add_argument("--report_from", help="rewrite the report from this saved JSON (no training or pruning)")
    p.add_argument("--scope", choices=SCOPES, default="global",
                   help="per_layer: the global-threshold rows prune every layer by the same fraction")
    p.add_argument("--rows", nargs="+", choices=SCORES,
                   help="prune only these rows; the others' cells come from --workdir's earlier run")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or ("oneshot_quick" if args.quick else "oneshot") + (
        "" if args.scope == "global" else f"_{args.scope}")
    every = list(rows_for(args.scope))
    if args.rows is None:
        args.rows = every
    elif set(args.rows) - set(every):
        p.error(f"--rows {sorted(set(args.rows) - set(every))}: not rows of --scope {args.scope} ({every})")
    if set(args.rows) != set(every) and not args.workdir:
        p.error("--rows needs the --workdir of an earlier run (the other rows' cells)")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from, encoding="utf-8") as f:
            saved = json.load(f)
        report(saved["cells"], saved["info"], args)
        return
    t0 = time.time()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="oneshot_bench_")
    workdir = args.workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    cells: List[Dict] = []
    reused = [s for s in args.seeds if os.path.exists(os.path.join(dense_folder(workdir, s), "latest"))]
    if set(args.rows) != set(rows_for(args.scope)):  # before any training: the other rows' cells must be there
        lacking = [s for s in args.seeds if s not in reused or not os.path.exists(cells_file(workdir, s, args.scope))]
        if lacking:
            raise SystemExit(f"--rows: seeds {lacking} have no dense checkpoint and cells in {workdir}: "
                             "run every row once with this --workdir first")
    for seed in args.seeds:
        ckpt = train_dense(seed, args, workdir)
        print(f"seed {seed}: trained {ckpt} ({time.time() - t0:.0f} s)", flush=True)
        cells += prune_matrix(ckpt, seed, args, workdir)
        print(f"seed {seed}: pruned {len(args.rows) * len(COMPENSATIONS) * len(SPARSITIES)} cells "
              f"({time.time() - t0:.0f} s)", flush=True)
    info = {"command": "python benchmarks/oneshot.py " + " ".join(shlex.quote(a) for a in argv),
            "seeds": args.seeds, "steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "num_batches": args.num_batches, "eval_batches": args.eval_batches, "ridge": args.ridge,
            "seconds": time.time() - t0, "nproc": len(os.sched_getaffinity(0)), "reused_seeds": reused,
            "rows": args.rows, "scope": args.scope}
    report(cells, info, args)
    if tmp is not None:
        tmp.cleanup()


def report(cells: List[Dict], info: Dict, args) -> None:
    """Tables, targets and plot from the cells (also ``--report_from`` a saved JSON)."""
    rows = summarise(cells)
    dense = statistics.fmean(c["dense_ppl"] for c in {c["seed"]: c for c in cells}.values())
    checks = targets(rows, dense)
    info = {**info, "dense": dense}
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, args.out)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"info": info, "rows": rows, "targets": checks, "cells": cells}, f, indent=2)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(rows, checks, info))
    plot(rows, dense, base + ".png", info["command"], info["nproc"])
    print(markdown(rows, checks, info))


if __name__ == "__main__":
    main()
