#!/usr/bin/env python
"""Cost of ``score: obs``: the greedy removal order (``ds_bitter7.obs.removal_order``) by MLP width,
on one rank and shared by two.

    python benchmarks/obs_cost.py [--widths 512 2048 4096] [--repeats 3] [--threads 2] [--device cuda --out DIR]

A GPT-2-shaped model of 4 layers (n_inner = width, n_embd = width / 4) with random weights and a
random full-rank covariance per layer (2 x width correlated rows). Two ranks (gloo) are spawned
once; per repeat, side by side: rank 0 alone with ``--threads`` threads, then both ranks with half
as many each (the same cores), each running the greedy of its 2 layers. Timed: the whole order of
every MLP neuron (what ``pruner.unit_scores()`` computes) and an event's order at 75% (its rounds
stop once the pruned prefix is settled); and, for scale, one float64 ``width x width`` inverse per
layer (what least squares also pays). Medians over ``--repeats`` (widths above 2048 once: minutes
each on 2 cores). Writes benchmarks/results/obs_cost.{json,md} (``--out``: that folder instead).
``--device cuda``: weights and matrices on the GPU (both ranks share it; gloo), timed to the
device's synchronize.
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
from _common import command_line, spawn_ranks
from transformers import GPT2Config, GPT2LMHeadModel

from ds_bitter7 import obs
from ds_bitter7.calibration import UnitStats
from ds_bitter7.config import StructureName
from ds_bitter7.structures import unit_groups

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS = 4


def setup(width: int, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=width // 4, n_head=4, n_inner=width, vocab_size=256,
                                       n_positions=32, bos_token_id=0, eos_token_id=0)).to(device)
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = {}
    for g in groups:
        x = torch.randn(2 * width, width, dtype=torch.float64, device=device) @ (
            torch.randn(width, width, dtype=torch.float64, device=device) / width ** 0.5)
        stats[g.key] = UnitStats(x.shape[0], x.mean(0), x.var(0, unbiased=False), x.T @ x / x.shape[0])
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool, device=device) for g in groups}
    return model, groups, stats, masks


def _timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its seconds; under torch.distributed, until every rank is done."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if kwargs.get("comm") is not None and kwargs["comm"].world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return out, time.perf_counter() - t0


def _ranks(rank: int, world: int, widths: list, repeats: int, threads: int, device: str) -> list:
    """Every width's timings, on rank 0's clock."""
    import torch.distributed as dist

    from ds_bitter7.comm import Communicator

    dist.init_process_group("gloo")
    comm, rows = Communicator(), []
    for width in widths:
        model, groups, stats, masks = setup(width, device)
        times = {k: [] for k in ("full_1", "full_2", "event_1", "event_2", "inverse")}
        same = True
        for _ in range(repeats if width <= 2048 else 1):
            for name, fraction in (("full", None), ("event", 0.75)):
                args = (groups, model, stats, masks, 1e-3)
                dist.barrier()
                if rank == 0:
                    torch.set_num_threads(threads)
                    alone, t = _timed(obs.removal_order, *args, fraction=fraction, min_keep=1, comm=obs.LOCAL)
                    times[f"{name}_1"].append(t)
                torch.set_num_threads(max(1, threads // world))
                dist.barrier()
                shared, t = _timed(obs.removal_order, *args, fraction=fraction, min_keep=1, comm=comm)
                times[f"{name}_2"].append(t)
                if rank == 0:
                    same &= all(torch.equal(alone[k], shared[k]) for k in alone)
            if rank == 0:
                torch.set_num_threads(threads)
                _, t = _timed(inverses, stats)
                times["inverse"].append(t)
        rows.append({"width": width, "units": LAYERS * width, "repeats": len(times["full_2"]), "same_order": same, "h_bytes_per_layer": width * width * 8,
                     **{f"{k}_seconds": v for k, v in times.items()}})
    return rows


def inverses(stats: dict) -> list:
    """Every layer's damped centered covariance inverted, as obs and least squares do."""
    out = []
    for st in stats.values():
        cov = st.second_moment - torch.outer(st.mean, st.mean)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        out.append(torch.linalg.inv(cov + 1e-3 * float(cov.diagonal().mean()) * eye))
    return out


def render(doc: dict, out: str = RESULTS) -> None:
    """Write ``doc`` (info and rows) as obs_cost.json and the table obs_cost.md in ``out``."""
    info, rows, med = doc["info"], doc["rows"], statistics.median
    for r in rows:
        r.pop("units_per_step", None)  # derived below (the first runs of this script stored it wrongly)
        for k in ("full", "event"):
            r[f"{k}_ratio"] = med(a / b for a, b in zip(r[f"{k}_1_seconds"], r[f"{k}_2_seconds"]))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "obs_cost.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    threads = info["threads"]
    lines = ["# Cost of `score: obs` (the greedy removal order)", "",
             f"Command: `{info['command']}`; {threads} CPU threads in all, torch {info['torch']}, float64"
             f"{' on ' + info['device'] if info.get('device', 'cpu') != 'cpu' else ''}. "
             f"{LAYERS} layers of MLP neurons. Per repeat, side by side: rank 0 alone with {threads} threads, "
             f"then 2 ranks (gloo) with {max(1, threads // 2)} each, each running the greedy of its 2 layers "
             "and holding only their matrices. *Full*: the whole order (`pruner.unit_scores()`); *event*: the order "
             "an event at 75% needs (its rounds stop once the pruned prefix is settled). Medians of the repeats; "
             "speed-up: median over repeats of 1 rank / 2 ranks. *Units per step*: of each layer, "
             f"ceil(units / {info['steps_constant']}).", "",
             "| MLP width | units | units per step | full, 1 rank, s | full, 2 ranks, s | speed-up | "
             "event 75%, 1 rank, s | event, 2 ranks, s | speed-up | 4 inverses, s | H per layer | same order |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['units']} | {math.ceil(r['units'] / info['steps_constant'])} | "
                     f"{med(r['full_1_seconds']):.2f} | "
                     f"{med(r['full_2_seconds']):.2f} | {r['full_ratio']:.2f}x | {med(r['event_1_seconds']):.2f} | "
                     f"{med(r['event_2_seconds']):.2f} | {r['event_ratio']:.2f}x | {med(r['inverse_seconds']):.2f} | "
                     f"{r['h_bytes_per_layer'] / 2**20:.0f} MiB | {'yes' if r['same_order'] else 'NO'} |")
    lines += ["", f"Repeats: {', '.join(str(r['repeats']) for r in rows)} (by width). *Same order*: the 2-rank "
              "orders equal rank 0's alone, unit for unit, in every repeat."]
    with open(os.path.join(out, "obs_cost.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where weights and matrices live (cpu, cuda)")
    p.add_argument("--out", default=RESULTS, help="folder for obs_cost.{json,md}")
    p.add_argument("--from_json", help="re-render the table of an earlier run's obs_cost.json")
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            render(json.load(f), args.out)
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the spawned ranks inherit it
    rows = spawn_ranks(_ranks, 2, (args.widths, args.repeats, args.threads, args.device), timeout=7200)[0]
    for r in rows:
        print(json.dumps(r), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    render({"info": {"command": command_line(), "threads": args.threads, "torch": torch.__version__, "device": device,
                     "machine": platform.processor() or platform.machine(), "steps_constant": obs.STEPS},
            "rows": rows}, args.out)


if __name__ == "__main__":
    main()
