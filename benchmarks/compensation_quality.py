#!/usr/bin/env python
"""Does bias compensation help? Equal training budget, GPT-2 from scratch, ZeRO-2 on 2 ranks.

Methods (MLP neurons only): ``bitter7`` without and with bias compensation, and
``bitter7_variance`` (bitter7 x activation std) with compensation; each at 50% and 90% neuron
sparsity and over several seeds, plus an unpruned baseline. Every run is ``launch/train.py``
under ``torchrun`` with the same steps, data, learning rate and schedule; only the ``"bitter7"``
section differs. Writes ``benchmarks/results/compensation_quality.{json,md}`` with the mean and
spread (sample std, min, max) of the final validation perplexity, measured after the recovery
training that follows the last pruning event.

    python benchmarks/compensation_quality.py --quick        # ~20 min on 2 CPU cores
    python benchmarks/compensation_quality.py                # longer runs, 3 seeds

``--oneshot`` measures what compensation itself does, with no recovery training: train a dense
model for ``--steps`` steps (ZeRO-2, 2 ranks), then ``pruner.prune_to(s)`` for each sparsity in
turn, and the validation perplexity right after each event, with and without compensation
(``benchmarks/results/compensation_oneshot.{json,md}``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from _common import ROOT, command_line, cpu_env

RESULTS = os.path.join(ROOT, "benchmarks", "results")

METHODS = {
    "dense": None,
    "bitter7": {"score": "bitter7", "bias_compensation": {"enabled": False}},
    "bitter7+comp": {"score": "bitter7", "bias_compensation": {"enabled": True}},
    "bitter7_variance+comp": {"score": "bitter7_variance", "bias_compensation": {"enabled": True}},
}


def ds_config(bitter7: Optional[dict], sparsity: float, steps: int, micro_batch: int, calib_batches: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3,
                                                     "warmup_num_steps": max(1, steps // 10)}},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    }
    if bitter7 is not None:
        section = copy.deepcopy(bitter7)
        section.update({"enabled": True, "structures": ["mlp_neuron"], "target_sparsity": sparsity,
                        "scope": "global",
                        # prune from 20% to 70% of the budget, then recover for the last 30%
                        "schedule": {"start_step": steps // 5, "end_step": (7 * steps) // 10,
                                     "frequency": max(1, steps // 20), "shape": "cubic"}})
        section["bias_compensation"] = dict(section["bias_compensation"], num_batches=calib_batches)
        cfg["bitter7"] = section
    return cfg


def run_one(method: str, sparsity: float, seed: int, args, workdir: str) -> Dict:
    cfg_path = os.path.join(workdir, f"{method}_{sparsity}_{seed}.json")
    summary = os.path.join(workdir, f"{method}_{sparsity}_{seed}.summary.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(ds_config(METHODS[method], sparsity, args.steps, args.micro_batch, args.calibration_batches), f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_port", str(29700 + seed % 100), os.path.join(ROOT, "launch", "train.py"),
           "--config", cfg_path, "--model", args.model, "--steps", str(args.steps),
           "--seq_len", str(args.seq_len), "--eval_every", "0", "--eval_batches", str(args.eval_batches),
           "--calibration_batches", str(args.calibration_batches), "--seed", str(seed),
           "--summary", summary]
    t0 = time.time()
    proc = subprocess.run(cmd, env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=args.run_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} sparsity {sparsity} seed {seed} failed:\n{proc.stderr[-4000:]}")
    with open(summary, encoding="utf-8") as f:
        out = json.load(f)
    return {"method": method, "sparsity": sparsity, "seed": seed, "ppl": out["ppl_final"],
            "loss": out["loss_final"], "ppl_start": out["ppl_start"], "seconds": time.time() - t0,
            "mlp_sparsity": (out.get("sparsity") or {}).get("mlp_neuron", 0.0)}


def summarise(runs: List[Dict]) -> List[Dict]:
    rows = []
    keys = sorted({(r["method"], r["sparsity"]) for r in runs}, key=lambda k: (k[1], list(METHODS).index(k[0])))
    for method, sparsity in keys:
        ppl = [r["ppl"] for r in runs if r["method"] == method and r["sparsity"] == sparsity]
        rows.append({"method": method, "sparsity": sparsity, "n": len(ppl), "ppl_mean": statistics.fmean(ppl),
                     "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                     "ppl_min": min(ppl), "ppl_max": max(ppl)})
    return rows


def markdown(rows: List[Dict], args) -> str:
    lines = ["# Bias compensation: validation perplexity at equal budget",
             "", f"Command: `{command_line()}` (2 CPU cores)", "",
             f"{args.model}, {args.steps} steps, seq_len {args.seq_len}, micro-batch {args.micro_batch} x "
             f"{args.ranks} ranks, ZeRO-2 fp32 on CPU; MLP neurons pruned from step {args.steps // 5} to "
             f"{(7 * args.steps) // 10} (cubic), then recovery; seeds {args.seeds}. Mean +- sample std "
             "(min..max) of the final validation perplexity.",
             "",
             "| MLP sparsity | method | runs | val ppl mean +- std | min .. max |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['method']} | {r['n']} | {r['ppl_mean']:.3f} +- {r['ppl_std']:.3f} "
                     f"| {r['ppl_min']:.3f} .. {r['ppl_max']:.3f} |")
    return "\n".join(lines) + "\n"


def oneshot_worker(args) -> None:
    """Runs on every rank under torchrun: dense training, then one-shot events, perplexity after each."""
    import math

    import deepspeed
    import torch
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    import ds_bitter7
    from ds_bitter7 import data as dsdata
    from ds_bitter7 import modeling

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    deepspeed.runtime.utils.set_random_seed(args.seed)
    tok = dsdata.get_tokenizer(None)
    train, val = dsdata.load_text_datasets(["builtin"], seed=args.seed)
    train_blocks, val_blocks = dsdata.chunk_dataset(train, tok, args.seq_len), dsdata.chunk_dataset(val, tok, args.seq_len)
    model = modeling.build_model(args.model, dsdata.tokenizer_vocab_size(tok), max_positions=256, seed=args.seed)
    calib = dsdata.calibration_batches(train_blocks, args.micro_batch, args.calibration_batches, args.seed)
    method = METHODS[args.method]
    cfg = ds_config(method, 0.5, args.steps, args.micro_batch, args.calibration_batches)
    cfg["bitter7"]["schedule"] = {"start_step": 10**9, "end_step": 10**9}  # events only from prune_to
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=calib)
    pruner = ds_bitter7.get_pruner(engine)
    batches = dsdata.iterate_forever(dsdata.make_dataloader(train_blocks, args.micro_batch, seed=args.seed))
    for _ in range(args.steps):
        ids = next(batches)["input_ids"]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    val_loader = dsdata.make_dataloader(val_blocks, args.micro_batch, shuffle=False, drop_last=False)

    def perplexity() -> float:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i, b in enumerate(val_loader):
                if i >= args.eval_batches:
                    break
                total += torch.tensor([float(model(input_ids=b["input_ids"], labels=b["input_ids"]).loss), 1.0],
                                      dtype=torch.float64)
        dist.all_reduce(total)
        model.train()
        return math.exp(float(total[0] / total[1]))

    out = {"method": args.method, "seed": args.seed, "dense": perplexity(), "after": {}}
    for sparsity in args.sparsities:
        pruner.prune_to(sparsity)
        out["after"][str(sparsity)] = perplexity()
    if rank == 0:
        with open(args.worker_out, "w", encoding="utf-8") as f:
            json.dump(out, f)


def run_oneshot(args) -> None:
    runs = []
    with tempfile.TemporaryDirectory(prefix="b7oneshot_") as workdir:
        for seed in args.seeds:
            for method in [m for m in args.methods if m != "dense"]:
                out = os.path.join(workdir, f"{method}_{seed}.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                       "--master_port", str(29800 + seed % 100), os.path.abspath(__file__), "--worker_oneshot",
                       "--method", method, "--seeds", str(seed), "--worker_out", out, "--steps", str(args.steps),
                       "--seq_len", str(args.seq_len), "--eval_batches", str(args.eval_batches),
                       "--micro_batch", str(args.micro_batch), "--model", args.model,
                       "--calibration_batches", str(args.calibration_batches),
                       "--sparsities", *[str(x) for x in args.sparsities]]
                proc = subprocess.run(cmd, env=cpu_env(), cwd=ROOT, capture_output=True, text=True,
                                      timeout=args.run_timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"one-shot {method} seed {seed} failed:\n{proc.stderr[-4000:]}")
                with open(out, encoding="utf-8") as f:
                    r = json.load(f)
                print(f"{method:>22} seed {seed}: dense {r['dense']:.3f} -> "
                      + ", ".join(f"{k}: {v:.3f}" for k, v in r["after"].items()), flush=True)
                runs.append(r)
    lines = ["# Bias compensation, one shot: validation perplexity right after pruning", "",
             f"Command: `{command_line()}` (2 CPU cores)", "",
             f"{args.model} trained dense for {args.steps} steps (ZeRO-2, {args.ranks} ranks, CPU), then "
             "`prune_to(s)` for each sparsity in turn (MLP neurons, global threshold), no recovery "
             f"training; seeds {args.seeds}. Mean +- sample std over seeds.", "",
             "| method | dense | " + " | ".join(f"{float(s):.0%} MLP sparsity" for s in args.sparsities) + " |",
             "|---" * (2 + len(args.sparsities)) + "|"]
    for method in [m for m in args.methods if m != "dense"]:
        rs = [r for r in runs if r["method"] == method]

        def cell(values: List[float]) -> str:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.3f} +- {sd:.3f}"
        cells = [cell([r["dense"] for r in rs])] + [cell([r["after"][str(s)] for r in rs]) for s in args.sparsities]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = args.out.replace("compensation_quality", "compensation_oneshot")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs}, f, indent=2)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (CPU, minutes)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--eval_batches", type=int)
    p.add_argument("--calibration_batches", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--run_timeout", type=int, default=1800)
    p.add_argument("--out", default=os.path.join(RESULTS, "compensation_quality"))
    p.add_argument("--oneshot", action="store_true", help="prune a dense-trained model once, no recovery")
    p.add_argument("--worker_oneshot", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (150 if args.quick else 1000)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    args.eval_batches = args.eval_batches or (8 if args.quick else 32)
    if args.worker_oneshot:
        args.seed = args.seeds[0]
        return oneshot_worker(args)
    if args.oneshot:
        return run_oneshot(args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="b7comp_") as workdir:
        for seed in args.seeds:
            for sparsity in args.sparsities:
                for method in args.methods:
                    if method == "dense" and sparsity != args.sparsities[0]:
                        continue  # the dense baseline does not depend on the sparsity
                    r = run_one(method, sparsity if method != "dense" else 0.0, seed, args, workdir)
                    print(f"{method:>22} sparsity {r['sparsity']:.2f} seed {seed}: val ppl {r['ppl']:.3f} "
                          f"({r['seconds']:.0f} s)", flush=True)
                    runs.append(r)
    rows = summarise(runs)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"config": config, "summary": rows, "runs": runs}, f, indent=2)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
