#!/usr/bin/env python
"""Pruning quality at equal budget: GPT-2 from scratch on the built-in corpus, ZeRO-2, 2 ranks.

Every ds_bitter7 run is ``launch/train.py`` under ``torchrun`` with a generated DeepSpeed config
(written to a temp dir): same steps, data, seeds, learning rate and schedule; only the
``"bitter7"`` section differs. Pruning is gradual: from 20% to 70% of the steps, an event every
``steps // 20`` steps, cubic, then 30% of the budget for recovery. The external peer,
Torch-Pruning (``benchmarks/peer_torch_pruning.py``), prunes the MLP neurons one-shot at the step
where our schedule starts and fine-tunes for the rest of the same budget, in one process that
replays the two ranks' micro-batches.

Writes ``benchmarks/results/<out>.md`` and ``.json`` (mean, sample std, min..max of the final
validation perplexity; ratio to magnitude at the same setting) and two PNG plots: validation
perplexity against step, and final perplexity against MLP sparsity. Each finished run is cached
under ``benchmarks/results/quality_runs/<workload key>/``, so an interrupted matrix resumes and a
larger matrix at the same workload reuses the runs of ``--quick``.

    python benchmarks/quality.py --quick     # reduced matrix, see QUICK below
    python benchmarks/quality.py             # full matrix: 8 methods x 3 settings x 3 seeds, 300 steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict, List, Optional

from _common import ROOT, reference_ds_config, run_logged, warmup

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PEER = "torch_pruning"

# method -> "bitter7" section overrides (None: dense; PEER: the external peer)
METHODS: Dict[str, Optional[dict]] = {
    "dense": None,
    "magnitude": {"score": "magnitude"},
    "movement": {"score": "movement"},
    "fisher": {"score": "fisher"},
    "bitter7": {"score": "bitter7"},
    "bitter7+comp": {"score": "bitter7", "bias_compensation": {"enabled": True, "source": "calibration"}},
    "bitter7_variance+comp": {"score": "bitter7_variance",
                              "bias_compensation": {"enabled": True, "source": "calibration"}},
    PEER: {},
}
# setting -> (structures, target sparsity); the sparsity applies to each structure type
SETTINGS: Dict[str, tuple] = {
    "mlp50": (["mlp_neuron"], 0.5),
    "mlp90": (["mlp_neuron"], 0.9),
    "heads+mlp50": (["mlp_neuron", "attention_head"], 0.5),
}
QUICK = {"steps": 100, "seeds": [1], "methods": ["dense", "magnitude", "bitter7", "bitter7+comp", PEER],
         "settings": ["mlp50", "mlp90", "heads+mlp50"]}


def schedule(steps: int) -> dict:
    """Prune from 20% to 70% of the budget (cubic), then recover for the last 30%."""
    return {"start_step": steps // 5, "end_step": (7 * steps) // 10, "frequency": max(1, steps // 20),
            "shape": "cubic"}


def ds_config(method: str, setting: str, args, monitor_dir: str) -> dict:
    cfg = reference_ds_config(args.steps, args.lr, args.micro_batch)
    # launch/train.py sends Val/ppl to DeepSpeed's monitor: one CSV per metric
    cfg["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "run"}
    if METHODS[method] is not None:
        structures, sparsity = SETTINGS[setting]
        section = {"enabled": True, "structures": structures, "target_sparsity": sparsity, "scope": "global",
                   "schedule": schedule(args.steps)}
        section.update(copy.deepcopy(METHODS[method]))
        if "bias_compensation" in section:
            section["bias_compensation"]["num_batches"] = args.calibration_batches
        cfg["bitter7"] = section
    return cfg


def read_curve(path: str) -> List[List[float]]:
    """[[step, ppl], ...] from a csv_monitor file (header ``step,<name>``)."""
    rows: Dict[int, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines()[1:]:
            step, value = line.split(",")[:2]
            rows[int(float(step))] = float(value)  # a repeated step keeps the last value
    return [[s, rows[s]] for s in sorted(rows)]


def run_ds(method: str, setting: str, seed: int, args, workdir: str) -> Dict:
    name = f"{method}_{setting}_{seed}"
    monitor = os.path.join(workdir, name, "monitor")
    cfg_path, summary = os.path.join(workdir, name, "ds_config.json"), os.path.join(workdir, name, "summary.json")
    os.makedirs(monitor, exist_ok=True)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(ds_config(method, setting, args, monitor + "/"), f, indent=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_port", str(args.port), os.path.join(ROOT, "launch", "train.py"),
           "--config", cfg_path, "--model", args.model, "--steps", str(args.steps),
           "--seq_len", str(args.seq_len), "--eval_every", str(eval_every(args.steps)),
           "--eval_batches", str(args.eval_batches), "--calibration_batches", str(args.calibration_batches),
           "--seed", str(seed), "--summary", summary]
    _run(cmd, name, args.run_timeout, workdir)
    with open(summary, encoding="utf-8") as f:
        out = json.load(f)
    return {"ppl": out["ppl_final"], "ppl_start": out["ppl_start"], "train_seconds": out["seconds"],
            "sparsity": out.get("sparsity") or {}, "params_kept": out.get("params_kept"),
            "params_total": out.get("params_total"),
            "curve": read_curve(os.path.join(monitor, "run", "Val_ppl.csv"))}


def run_peer(setting: str, seed: int, args, workdir: str) -> Dict:
    name = f"{PEER}_{setting}_{seed}"
    summary = os.path.join(workdir, name + ".json")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "peer_torch_pruning.py"), "--model", args.model,
           "--steps", str(args.steps), "--prune_step", str(schedule(args.steps)["start_step"]),
           "--sparsity", str(SETTINGS[setting][1]), "--seq_len", str(args.seq_len),
           "--micro_batch", str(args.micro_batch), "--ranks", str(args.ranks), "--lr", str(args.lr),
           "--warmup", str(warmup(args.steps)), "--eval_every", str(eval_every(args.steps)),
           "--eval_batches", str(args.eval_batches), "--seed", str(seed), "--summary", summary]
    _run(cmd, name, args.run_timeout, workdir)
    with open(summary, encoding="utf-8") as f:
        out = json.load(f)
    return {"ppl": out["ppl_final"], "ppl_start": out["ppl_start"], "train_seconds": out["seconds"],
            "sparsity": out["sparsity"], "params_kept": out["params_after"], "params_total": None,
            "curve": out["curve"]}


def eval_every(steps: int) -> int:
    return max(1, steps // 10)


def _run(cmd: List[str], name: str, timeout: int, workdir: str) -> None:
    run_logged(cmd, os.path.join(workdir, name + ".log"), timeout, name)


def run_one(method: str, setting: str, seed: int, args, workdir: str) -> Dict:
    """One run, from the cache if it already finished with these arguments."""
    cache = os.path.join(args.cache, f"{method}_{setting}_{seed}.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    t0 = time.time()
    out = run_peer(setting, seed, args, workdir) if method == PEER else run_ds(method, setting, seed, args, workdir)
    out.update(method=method, setting=setting, seed=seed, wall_seconds=time.time() - t0, code=code_state())
    os.makedirs(args.cache, exist_ok=True)
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    return out


def plan(args) -> List[tuple]:
    """(method, setting, seed) in run order; dense once per seed, the peer on MLP settings only."""
    out = []
    for seed in args.seeds:
        if "dense" in args.methods:
            out.append(("dense", "dense", seed))
        for setting in args.settings:
            for method in args.methods:
                if method == "dense" or (method == PEER and "attention_head" in SETTINGS[setting][0]):
                    continue
                out.append((method, setting, seed))
    return out


def code_state() -> str:
    """Commit and uncommitted library/launcher files: runs depend on the working tree, not only HEAD."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "ds_bitter7", "launch"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}" + (f" + {len(dirty)} uncommitted files under ds_bitter7/ and launch/" if dirty else "")


def machine() -> Dict:
    import deepspeed
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch_pruning as tp
        tp_version = getattr(tp, "__version__", "?")
    except ImportError:
        tp_version = "not installed"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "torch_pruning": tp_version,
            "load_avg_1min_at_end": os.getloadavg()[0], "code": code_state()}


def summarise(runs: List[Dict]) -> List[Dict]:
    groups: Dict[tuple, List[Dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    rows = []
    for (setting, method), rs in groups.items():
        ppl = [r["ppl"] for r in rs]
        rows.append({"setting": setting, "method": method, "n": len(ppl), "seeds": sorted(r["seed"] for r in rs),
                     "ppl_mean": statistics.fmean(ppl), "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else None,
                     "ppl_min": min(ppl), "ppl_max": max(ppl),
                     "mlp_sparsity": statistics.fmean(r["sparsity"].get("mlp_neuron", 0.0) for r in rs),
                     "head_sparsity": statistics.fmean(r["sparsity"].get("attention_head", 0.0) for r in rs)})
    for row in rows:
        mag = next((m for m in rows if m["setting"] == row["setting"] and m["method"] == "magnitude"), None)
        row["ratio_to_magnitude"] = row["ppl_mean"] / mag["ppl_mean"] if mag else None
        # paired by seed: same init and data order, only the pruning differs
        mine = {r["seed"]: r["ppl"] for r in groups[(row["setting"], row["method"])]}
        base = {r["seed"]: r["ppl"] for r in groups.get((row["setting"], "magnitude"), [])}
        paired = [mine[s] / base[s] for s in sorted(mine) if s in base]
        row["paired_ratios"] = paired
        row["seeds_better_than_magnitude"] = sum(x < 1.0 for x in paired)
    order = {s: i for i, s in enumerate(["dense", *SETTINGS])}
    rows.sort(key=lambda r: (order[r["setting"]], list(METHODS).index(r["method"])))
    return rows


def verdicts(rows: List[Dict]) -> List[str]:
    """One plain sentence per setting: does bitter7 (each variant) beat magnitude?"""
    out = []
    for row in rows:
        if not row["method"].startswith("bitter7") or row["ratio_to_magnitude"] is None:
            continue
        mag = next(m for m in rows if m["setting"] == row["setting"] and m["method"] == "magnitude")
        overlap = row["ppl_min"] <= mag["ppl_max"] and mag["ppl_min"] <= row["ppl_max"]
        if row["ppl_mean"] < mag["ppl_mean"]:
            how = "beats magnitude" + (" (but the seed ranges overlap)" if overlap and row["n"] > 1 else "")
            if row["n"] == 1:
                how += " (one seed: no spread measured)"
        else:
            how = "does NOT beat magnitude"
        out.append(f"- {row['setting']}: {row['method']} {how}: mean val ppl {row['ppl_mean']:.2f} vs "
                   f"{mag['ppl_mean']:.2f}, ratio {row['ratio_to_magnitude']:.3f}; lower than magnitude on "
                   f"{row['seeds_better_than_magnitude']} of {len(row['paired_ratios'])} seeds (paired).")
    return out


def dense_caveats(rows: List[Dict]) -> List[str]:
    """Say so when pruned runs end no worse than dense: the budget then cannot rank the criteria."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out = []
    for setting in SETTINGS:
        pruned = [r for r in rows if r["setting"] == setting]
        at_or_below = [r["method"] for r in pruned if r["ppl_mean"] <= dense["ppl_mean"]] if dense else []
        if at_or_below:
            out.append(f"- {setting}: {len(at_or_below)} of {len(pruned)} pruned methods end at or below dense "
                       f"({dense['ppl_mean']:.2f}): {', '.join(at_or_below)}. At this budget removing these units "
                       "does not cost perplexity, so differences between criteria here are mostly seed noise.")
    return out


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(rows: List[Dict], info: Dict) -> str:
    a = info["args"]
    sch = schedule(a["steps"])
    lines = [
        "# Pruning quality at equal budget",
        "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']['nproc']} CPUs ({info['machine']['cpu']}), torch {info['machine']['torch']}, "
        f"deepspeed {info['machine']['deepspeed']}, transformers {info['machine']['transformers']}, "
        f"torch_pruning {info['machine']['torch_pruning']}, python {info['machine']['python']}; "
        f"load average at the end {info['machine']['load_avg_1min_at_end']:.1f}; wall time of this invocation "
        f"{info['wall_seconds'] / 60:.1f} min, sum of the {info['n_runs']} runs' wall times (cached runs included) "
        f"{info['runs_wall_seconds'] / 60:.1f} min. Code at summary time: {info['machine']['code']} "
        "(each run's own is in the JSON, where recorded).",
        "",
        f"Workload: {a['model']} from scratch on the built-in corpus (byte tokens), {a['steps']} steps, "
        f"seq_len {a['seq_len']}, micro-batch {a['micro_batch']} x {a['ranks']} ranks, ZeRO-2 fp32 on CPU (gloo), "
        f"AdamW lr {a['lr']} (linear warm-up {warmup(a['steps'])} steps), clip 1.0; seeds {a['seeds']}. "
        f"ds_bitter7 prunes gradually, global scope: events every {sch['frequency']} steps from step "
        f"{sch['start_step']} to {sch['end_step']} (cubic), then recovery. `{PEER}`: Torch-Pruning "
        f"MetaPruner, group L2 magnitude, global ranking, MLP neurons removed one-shot at step "
        f"{sch['start_step']}, new AdamW with the warm-up restarted, fine-tuned to step {a['steps']}; ONE process replaying the "
        f"{a['ranks']} ranks' micro-batches (same samples per step), not DeepSpeed.",
        "",
        "Final validation perplexity (lower is better); std is the sample std over seeds (n/a for one seed); "
        "ratio = mean / mean of magnitude at the same setting; per-seed ratios pair each seed with magnitude's run "
        "of the same seed (same init and data order).",
        "",
        "| setting | method | seeds | val ppl mean | std | min .. max | ratio to magnitude | per-seed ratios "
        "| MLP / head sparsity |",
        "|---|---|---|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | {r['n']} | {r['ppl_mean']:.2f} | {_fmt(r['ppl_std'])} | "
                     f"{r['ppl_min']:.2f} .. {r['ppl_max']:.2f} | {_fmt(r['ratio_to_magnitude'], '.3f')} | "
                     f"{', '.join(f'{x:.3f}' for x in r['paired_ratios']) or 'n/a'} | "
                     f"{r['mlp_sparsity']:.3f} / {r['head_sparsity']:.3f} |")
    lines += ["", "## bitter7 against magnitude", "", *verdicts(rows), ""]
    caveats = dense_caveats(rows)
    if caveats:
        lines += ["## Pruned against dense", "", *caveats, ""]
    lines += [
              f"Plots: `{os.path.basename(info['plots']['curves'])}`, `{os.path.basename(info['plots']['sparsity'])}`."]
    return "\n".join(lines) + "\n"


def footer(info: Dict) -> str:
    m = info["machine"]
    return (f"{textwrap.fill(info['command'], 110)}\n{m['nproc']} CPUs, {m['cpu']}; torch {m['torch']}, deepspeed {m['deepspeed']}, "
            f"torch_pruning {m['torch_pruning']}")


def _save(plt, fig, info: Dict, which: str, bottom: float) -> None:
    """Footer (command and machine), layout, PNG, close."""
    fig.text(0.01, 0.005, footer(info), fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(info["plots"][which], dpi=120)
    plt.close(fig)


def plot(runs: List[Dict], rows: List[Dict], info: Dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in runs)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.6), squeeze=False)
    colors = {m: ("black" if m == "dense" else f"C{i}") for i, m in enumerate(METHODS)}
    for ax, setting in zip(axes[0], settings):
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method and r["setting"] in (setting, "dense")]
            for i, r in enumerate(sorted(mine, key=lambda r: r["seed"])):
                steps, ppl = zip(*r["curve"])
                ax.plot(steps, ppl, color=colors[method], alpha=0.85, lw=1.2,
                        ls="--" if method == "dense" else "-", label=method if i == 0 else None)
        sch = schedule(info["args"]["steps"])
        ax.axvspan(sch["start_step"], sch["end_step"], color="0.9", zorder=0, label="pruning window")
        ax.set_yscale("log")
        ax.set_title(setting)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation perplexity")
        ax.legend(fontsize=7)
    _save(plt, fig, info, "curves", bottom=0.06)

    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method and r["setting"] in ("mlp50", "mlp90")]
        if method == "dense" or not pts:
            continue
        pts = ([dense] if dense else []) + sorted(pts, key=lambda r: r["mlp_sparsity"])
        # a small offset per method keeps the min..max bars apart
        xs = [p["mlp_sparsity"] + 0.006 * (list(METHODS).index(method) - 4) for p in pts]
        ax.errorbar(xs, [p["ppl_mean"] for p in pts],
                    yerr=[[p["ppl_mean"] - p["ppl_min"] for p in pts], [p["ppl_max"] - p["ppl_mean"] for p in pts]],
                    color=colors[method], marker="o", capsize=3, label=method)
    ax.set_xlabel("MLP neurons removed (fraction)")  # linear y: the final perplexities are close
    ax.set_ylabel("final validation perplexity (mean, bars: min..max)")
    ax.set_title("Final perplexity against MLP sparsity (0 = dense)")
    ax.legend(fontsize=7)
    _save(plt, fig, info, "sparsity", bottom=0.1)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"reduced matrix: {QUICK['steps']} steps, seeds {QUICK['seeds']}, methods "
                        f"{QUICK['methods']}, settings {QUICK['settings']}")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", choices=list(METHODS))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--calibration_batches", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--run_timeout", type=int, default=3600)
    p.add_argument("--out", help="output name under benchmarks/results (default: quality, or quality_quick)")
    p.add_argument("--cache", help="finished-run cache folder (default: benchmarks/results/quality_runs/<workload>;"
                                   " --quick and larger matrices at the same workload share runs)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else {"steps": 300, "seeds": [1, 2, 3], "methods": list(METHODS),
                                     "settings": list(SETTINGS)}
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or ("quality_quick" if args.quick else "quality")
    # runs are reusable only under the same workload: the key names everything they depend on
    key = f"{args.model}_s{args.steps}_L{args.seq_len}_b{args.micro_batch}x{args.ranks}_lr{args.lr}_e{args.eval_batches}"
    args.cache = args.cache or os.path.join(RESULTS, "quality_runs", key)
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t0, runs = time.time(), []
    todo = plan(args)
    with tempfile.TemporaryDirectory(prefix="b7quality_") as workdir:
        for i, (method, setting, seed) in enumerate(todo):
            r = run_one(method, setting, seed, args, workdir)
            print(f"[{i + 1}/{len(todo)}] {method:>22} {setting:>12} seed {seed}: val ppl {r['ppl']:.3f} "
                  f"({r['wall_seconds']:.0f} s)", flush=True)
            runs.append(r)
    rows = summarise(runs)
    out = os.path.join(RESULTS, args.out)
    info = {"command": command, "machine": machine(), "wall_seconds": time.time() - t0, "n_runs": len(runs),
            "runs_wall_seconds": sum(r["wall_seconds"] for r in runs),
            "args": {k: v for k, v in vars(args).items() if k not in ("cache", "out")},
            "schedule": schedule(args.steps), "plots": {"curves": out + "_curves.png", "sparsity": out + "_sparsity.png"}}
    os.makedirs(RESULTS, exist_ok=True)
    plot(runs, rows, info)
    text = markdown(rows, info)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump({**info, "summary": rows, "verdicts": verdicts(rows), "dense_caveats": dense_caveats(rows),
                   "runs": runs}, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
