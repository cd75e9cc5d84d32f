#!/usr/bin/env python
"""Why mean compensation can raise one-shot perplexity: the error it removes, and the one that counts.

Mean compensation folds the removed units' mean activation into the next bias, ``b += mu_R W_R``.
Per layer that is exact least squares for a constant: on the calibration tokens the out
projection's squared error ``E||(a_R - c) W_R||^2`` is smallest at ``c = mu_R``, so it can only go
down against no compensation (``c = 0``). Yet ``benchmarks/oneshot.py`` measures higher perplexity
with it than without for the best scores. This script checks, on the one-shot benchmark's dense
checkpoints (its ``--workdir``: ``dense_SEED``), where that comes from:

- it prunes each checkpoint with the one-shot command itself (2 ranks, MLP neurons, the
  benchmark's calibration and seeds), once with ``--compensation none`` and once with ``mean``,
  and loads both exported (smaller) models;
- per MLP, on the dense model's own MLP inputs, the squared error of the pruned MLP's output
  (summed over features, mean over tokens) on the calibration tokens and on validation tokens,
  split into its mean part ``||E e||^2`` and the rest;
- validation perplexity and the mean KL divergence of the pruned model's next-token distribution
  from the dense one's, for the whole model and with one pruned MLP at a time in the dense model;
- ``mean (val.)``: the ``none`` model with each MLP's mean error on the *validation* tokens added
  to its bias, which rules out a calibration/validation mismatch of the means.

Writes ``benchmarks/results/oneshot_mean_shift.{json,md}`` (``--out NAME``).

    python benchmarks/oneshot.py --workdir W                 # the dense checkpoints (800 steps)
    python benchmarks/oneshot_mean_shift.py W [W2000 ...]    # about 3 min per seed and 4 scores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import List

import oneshot as oneshot_bench  # benchmarks/oneshot.py: where its workdir keeps checkpoints
import torch
from _common import command_line, run_logged
from oneshot_headroom import load_dense, mlp_io, parse_workdir_args, seed_data, workdir_parser
from transformers import AutoModelForCausalLM

from ds_bitter7.checkpoint_files import MODEL_STATES_FILE, resolve_tag
from ds_bitter7.comm import LOCAL, free_port
from ds_bitter7.evaluation import perplexity

COMPENSATIONS = ("none", "mean")


def prune(dense_dir: str, out: str, score: str, comp: str, seed: int, args) -> None:
    """The one-shot command on 2 ranks, as the one-shot benchmark's cell (export into ``out``); an
    export an earlier invocation made from the same checkpoint files with the same arguments is kept."""
    command = ["-m", "ds_bitter7.oneshot", dense_dir, out, "--sparsity", str(args.sparsity),
               "--structures", "mlp_neuron", "--score", score, "--compensation", comp, "--calibration", "builtin",
               "--num_batches", str(args.num_batches), "--batch_size", str(args.batch_size),
               "--seq_len", str(args.seq_len), "--seed", str(seed), "--overwrite"]
    tag = resolve_tag(dense_dir)
    stamp = {"command": command, "tag": tag,
             "checkpoint_mtime_ns": os.stat(os.path.join(dense_dir, tag, MODEL_STATES_FILE)).st_mtime_ns}
    stamp_file = out + ".stamp.json"
    if os.path.isfile(os.path.join(out, "pruning_report.json")) and os.path.isfile(stamp_file):
        with open(stamp_file, encoding="utf-8") as f:
            if json.load(f) == stamp:
                return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port),
           *command]
    run_logged(cmd, out + ".log", args.run_timeout, f"one-shot {score} + {comp}, seed {seed}")
    with open(stamp_file, "w", encoding="utf-8") as f:
        json.dump(stamp, f)


def mlp_errors(model, pairs: List[tuple]) -> List[dict]:
    """Per block, the pruned MLP's output error on the dense MLP's inputs: total and mean part."""
    out = []
    with torch.no_grad():
        for block, (x, y) in zip(model.transformer.h, pairs):
            e = (block.mlp(x) - y).double()
            shift = e.mean(0)
            per_token = e.square().sum(1)
            out.append({"total": float(per_token.mean()), "mean_part": float(shift.square().sum()),
                        "shift": shift.float(), "per_token": per_token})
    return out


def mean_kl(dense, model, batches) -> float:
    """Mean over tokens of KL(dense || model) of the next-token distributions."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            p = torch.log_softmax(dense(input_ids=b["input_ids"]).logits.double(), -1)
            q = torch.log_softmax(model(input_ids=b["input_ids"]).logits.double(), -1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            n += p.shape[0] * p.shape[1]
    return total / n


def with_one_mlp(dense, pruned, layer: int):
    """The dense model with block ``layer``'s MLP taken from ``pruned``."""
    model = copy.deepcopy(dense)
    model.transformer.h[layer].mlp = pruned.transformer.h[layer].mlp
    return model


def run_seed(workdir: str, seed: int, args, calib, val, val_batches) -> List[dict]:
    folder = oneshot_bench.dense_folder(workdir, seed)
    dense, steps = load_dense(folder)
    pairs = {"calibration": mlp_io(dense, calib), "validation": mlp_io(dense, val_batches)}
    n_val = len(val_batches)
    dense_ppl = perplexity(dense, val, n_val, LOCAL)
    rows = []
    for score in args.scores:
        row = {"seed": seed, "steps": steps, "score": score, "dense_ppl": dense_ppl, "ppl": {}, "kl": {},
               "error": {}, "kl_one_layer": {}}
        for comp in COMPENSATIONS:
            out = os.path.join(workdir, "mean_shift", f"seed{seed}_{score}_{comp}_{args.sparsity}")
            prune(folder, out, score, comp, seed, args)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            row["ppl"][comp] = perplexity(model, val, n_val, LOCAL)
            row["kl"][comp] = mean_kl(dense, model, val_batches)
            row["error"][comp] = {split: mlp_errors(model, p) for split, p in pairs.items()}
            row["kl_one_layer"][comp] = [mean_kl(dense, with_one_mlp(dense, model, i), val_batches)
                                         for i in range(len(model.transformer.h))]
            if comp == "none":  # each MLP's mean error on the validation tokens, folded into its bias
                with torch.no_grad():
                    for block, err in zip(model.transformer.h, row["error"]["none"]["validation"]):
                        block.mlp.c_proj.bias -= err["shift"]
                row["ppl"]["mean (val.)"] = perplexity(model, val, n_val, LOCAL)
                row["kl"]["mean (val.)"] = mean_kl(dense, model, val_batches)
        # the other half of the split: the dense model with only the mean part of the `none` error
        shifted = copy.deepcopy(dense)
        with torch.no_grad():
            for block, err in zip(shifted.transformer.h, row["error"]["none"]["calibration"]):
                block.mlp.c_proj.bias += err["shift"]
        row["ppl"]["mean part only"] = perplexity(shifted, val, n_val, LOCAL)
        row["kl"]["mean part only"] = mean_kl(dense, shifted, val_batches)
        row["tokens_lower_under_mean"] = {
            split: [float((m["per_token"] < n["per_token"]).double().mean())
                    for n, m in zip(row["error"]["none"][split], row["error"]["mean"][split])]
            for split in pairs}
        for comp in COMPENSATIONS:
            for errs in row["error"][comp].values():
                for e in errs:
                    del e["shift"], e["per_token"]
        print(f"{folder} {score}: dense {dense_ppl:.3f} " + " ".join(f"{k} {v:.3f}" for k, v in row["ppl"].items()),
              flush=True)
        rows.append(row)
    return rows


def _mean(values) -> str:
    values = list(values)
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{spread}"


def markdown(rows: List[dict], args, command: str, seconds: float) -> str:
    lines = ["# One-shot: what mean compensation changes", "", f"Command: `{command}`  ",
             f"MLP neurons, {args.sparsity:.0%} removed in one shot by `python -m ds_bitter7.oneshot` on 2 ranks "
             f"(calibration: {args.num_batches} train-split batches per rank of {args.batch_size} x {args.seq_len} "
             f"tokens, as `benchmarks/oneshot.py`); errors and KL measured in one process on the union of those "
             f"calibration batches and on {2 * args.eval_batches} validation batches. Wall time {seconds / 60:.1f} min.",
             "", "Error: the pruned MLP's squared output error on the dense MLP's inputs, summed over features and "
             "layers, mean over tokens (its mean part in brackets). KL: mean KL(dense || pruned) per validation "
             "token. `mean (val.)`: the `none` model with each MLP's mean error on the validation tokens folded "
             "into its bias; `mean part only`: the dense model with only the mean part of the `none` error "
             "(calibration tokens) in its biases. Mean ± std over seeds.", ""]
    layer_rows = []
    for steps in sorted({r["steps"] for r in rows}):
        rs = [r for r in rows if r["steps"] == steps]
        lines += [f"## Dense model trained {steps} steps (dense {statistics.fmean(r['dense_ppl'] for r in rs):.3f}, "
                  f"seeds {sorted({r['seed'] for r in rs})})", "",
                  "| score | compensation | perplexity | KL | error, calibration | error, validation |",
                  "|---|---|---:|---:|---:|---:|"]
        for score in args.scores:
            sr = [r for r in rs if r["score"] == score]
            for comp in (*COMPENSATIONS, "mean (val.)", "mean part only"):
                errs = []
                for split in ("calibration", "validation"):
                    if comp not in sr[0]["error"]:
                        errs.append("")
                        continue
                    total = _mean(sum(e["total"] for e in r["error"][comp][split]) for r in sr)
                    part = statistics.fmean(sum(e["mean_part"] for e in r["error"][comp][split]) for r in sr)
                    errs.append(f"{total} ({part:.3f})")
                lines.append(f"| {score} | {comp} | {_mean(r['ppl'][comp] for r in sr)} | "
                             f"{_mean(r['kl'][comp] for r in sr)} | {errs[0]} | {errs[1]} |")
        lines.append("")
        lines += ["KL with one pruned MLP at a time in the dense model, none -> mean, per layer (in brackets: "
                  "the share of validation tokens whose MLP error mean compensation lowers):", ""]
        for score in args.scores:
            sr = [r for r in rs if r["score"] == score]
            n_layers = len(sr[0]["kl_one_layer"]["none"])
            cells = [f"{statistics.fmean(r['kl_one_layer']['none'][i] for r in sr):.4f} -> "
                     f"{statistics.fmean(r['kl_one_layer']['mean'][i] for r in sr):.4f} "
                     f"({statistics.fmean(r['tokens_lower_under_mean']['validation'][i] for r in sr):.0%})"
                     for i in range(n_layers)]
            lines.append(f"- {score}: " + "; ".join(cells))
        lines.append("")
        layer_rows += rs
    lowered = [(a["total"] > b["total"]) for r in layer_rows for split in ("calibration", "validation")
               for a, b in zip(r["error"]["none"][split], r["error"]["mean"][split])]
    raised = [r["kl"]["mean"] > r["kl"]["none"] for r in layer_rows]
    offset = [r["kl"]["none"] < r["kl"]["mean"] + r["kl"]["mean part only"] for r in layer_rows]
    lines += ["## Summary", "",
              f"- Mean compensation lowered the MLP output error in {sum(lowered)} of {len(lowered)} "
              "(seed, score, layer, split) cases, validation tokens included.",
              f"- It raised the KL from the dense model in {sum(raised)} of {len(raised)} (seed, score) cases.",
              f"- KL(none) < KL(mean) + KL(mean part only) in {sum(offset)} of {len(offset)}: the two parts of the "
              "error are not additive; where mean compensation loses, the mean part offsets part of the rest.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = workdir_parser(__doc__.split("\n\n")[0], "oneshot_mean_shift")
    p.add_argument("--scores", nargs="+", default=["bitter7", "obs", "magnitude"],
                   choices=["bitter7", "magnitude", "fisher", "bitter7_variance", "fluctuation", "obs", "bitter7_obs"])
    p.add_argument("--port", type=int, default=None, help="the one-shot runs' master port (default: a free one)")
    p.add_argument("--run_timeout", type=int, default=900)
    args = parse_workdir_args(p, argv)
    args.port = args.port or free_port()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command, t0 = command_line(argv), time.perf_counter()
    rows = []
    for seed in args.seeds:
        calib, val = seed_data(args, seed)
        val_batches = [b for _, b in zip(range(2 * args.eval_batches), val)]
        for w in args.workdirs:
            torch.manual_seed(seed)
            rows += run_seed(w, seed, args, calib, val, val_batches)
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, args.out)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"command": command, "args": vars(args), "rows": rows}, f, indent=2)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(rows, args, command, time.perf_counter() - t0) + "\n")
    print(f"wrote {base}.md")


if __name__ == "__main__":
    main()
