#!/usr/bin/env python
"""Cost of ``score: obs``: the greedy removal order (``ds_bitter7.obs.removal_order``) by MLP width.

    python benchmarks/obs_cost.py [--widths 512 2048 4096] [--repeats 3] [--threads 2]

A GPT-2-shaped model of 4 layers (n_inner = width, n_embd = width / 4) with random weights and a
random full-rank covariance per layer (2 x width correlated rows). Times the whole order of every
MLP neuron on rank 0 (what ``pruner.unit_scores()`` computes; an event stops the greedy at the
fraction it prunes, so it takes about that fraction of this), and, in the same run, one float64
``width x width`` inverse per layer (what least squares also pays) for scale. Medians over
``--repeats`` (widths above 2048 once: minutes each on 2 cores). Writes
benchmarks/results/obs_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
from _common import command_line
from transformers import GPT2Config, GPT2LMHeadModel

from ds_bitter7 import obs
from ds_bitter7.calibration import UnitStats
from ds_bitter7.config import StructureName
from ds_bitter7.structures import unit_groups

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS = 4


def setup(width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=width // 4, n_head=4, n_inner=width, vocab_size=256,
                                       n_positions=32, bos_token_id=0, eos_token_id=0))
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = {}
    for g in groups:
        x = torch.randn(2 * width, width, dtype=torch.float64) @ (torch.randn(width, width, dtype=torch.float64)
                                                                  / width ** 0.5)
        stats[g.key] = UnitStats(x.shape[0], x.mean(0), x.var(0, unbiased=False), x.T @ x / x.shape[0])
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    return model, groups, stats, masks


def measure(width: int, repeats: int) -> dict:
    model, groups, stats, masks = setup(width)
    order_s, inverse_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        obs.removal_order(groups, model, stats, masks, 1e-3)
        order_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for g in groups:  # the damped centered covariance, as obs and least squares invert it
            cov = stats[g.key].second_moment - torch.outer(stats[g.key].mean, stats[g.key].mean)
            torch.linalg.inv(cov + 1e-3 * float(cov.diagonal().mean()) * torch.eye(width, dtype=torch.float64))
        inverse_s.append(time.perf_counter() - t0)
    n = LAYERS * width
    per_step = math.ceil(n / obs.STEPS)  # as obs._greedy blocks its steps
    return {"width": width, "units": n, "greedy_steps": math.ceil(n / per_step),
            "units_per_step": per_step, "repeats": repeats,
            "order_seconds": statistics.median(order_s), "inverse_seconds": statistics.median(inverse_s),
            "h_bytes_per_layer": width * width * 8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for width in args.widths:
        rows.append(measure(width, args.repeats if width <= 2048 else 1))
        print(json.dumps(rows[-1]), flush=True)
    info = {"command": command_line(), "threads": args.threads, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "steps_constant": obs.STEPS}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "obs_cost.json"), "w", encoding="utf-8") as f:
        json.dump({"info": info, "rows": rows}, f, indent=2)
    lines = ["# Cost of `score: obs` (the greedy removal order)", "",
             f"Command: `{info['command']}`; {args.threads} CPU threads, torch {info['torch']}, float64. "
             f"{LAYERS} layers; the full greedy order of all MLP neurons on rank 0 (an event stops at the "
             "fraction it prunes: about that fraction of this time). Median of the repeats shown.", "",
             "| MLP width | units | greedy steps (units each) | order, s | 4 inverses, s | order / inverses | H per layer |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['units']} | {r['greedy_steps']} ({r['units_per_step']}) | "
                     f"{r['order_seconds']:.2f} | {r['inverse_seconds']:.2f} | "
                     f"{r['order_seconds'] / r['inverse_seconds']:.0f}x | {r['h_bytes_per_layer'] / 2**20:.0f} MiB |")
    lines += ["", f"Repeats: {', '.join(str(r['repeats']) for r in rows)} (by width)."]
    with open(os.path.join(RESULTS, "obs_cost.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
