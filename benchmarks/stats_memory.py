"""Host memory of the activation statistics that least squares (and ``obs``) need: the float64
``F x F`` matrix of every group.

``python benchmarks/stats_memory.py``: a GPT-2 with 4 blocks and MLP width 4096 (128 MiB of
``F x F`` per block), MLP neurons, ``bias_compensation.mode: least_squares``, one CPU process
per case (so its peak resident set is its own):
- ``calibration``: ``num_batches`` calibration batches, then ``gather()``;
- ``training``: the ``window`` optimizer steps of ``grad_accum`` micro-batches up to a scheduled
  event, then ``gather()`` (the last step's optimizer step and the event itself are not run).
Reported per case: the bytes of ``F x F`` sums the statistics hold before ``gather()`` (for
``training``, every window entry), the matrices ``gather()`` returns, and how far ``gather()``
raised the process's resident set above what it held just before: the peak (``VmHWM``) is reset
first (``/proc/self/clear_refs``), so earlier high-water marks do not hide it. With calibration
the peak also holds the calibration forwards' activations. Single process: the all-reduce is the
identity copy. Linux only.

``--device cuda`` runs the model on the GPU (one process, NCCL) and also reports the growth of the
GPU's allocated peak. ``--event SCORE`` also times one pruning event at ``--fraction`` (that
score, least squares, statistics gathered again), with its host (and GPU) peak growth;
``--layers_per_pass N`` sums the matrices N layers per calibration pass (calibration row only). The
``ds_bitter7`` imported is the first on ``PYTHONPATH``, else this checkout's (each row records
which), so two versions can be measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict

from _common import ROOT, command_line, cpu_env, spawn_ranks

MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _gpu_peak_reset(torch) -> int:
    """Reset the GPU's allocated peak; the bytes allocated now (0 without a GPU)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _gpu_peak_growth(torch, before: int) -> float:
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def _reset_rss_peak() -> int:
    """Reset the peak resident set (VmHWM) to the current one; the current one, KiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status_kib("VmRSS")


def measure(rank: int, world: int, source: str, args: argparse.Namespace) -> Dict:
    if args.device == "cpu":
        os.environ.update({k: v for k, v in cpu_env().items() if k not in os.environ})
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import ds_bitter7

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=4, n_inner=args.width,
                                       vocab_size=128, n_positions=args.seq_len)).to(args.device)
    event = args.window  # steps 1 .. window are the window before the event
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": args.grad_accum,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "bitter7": {"structures": ["mlp_neuron"], "schedule": {"start_step": event, "end_step": event},
                       "score": args.event or "bitter7",
                       "bias_compensation": {"enabled": True, "mode": "least_squares", "source": source,
                                             "num_batches": args.num_batches, "window": args.window,
                                             "layers_per_pass": args.layers_per_pass}}}
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 128, (2, args.seq_len), generator=gen)
            for _ in range(max(args.num_batches, args.window * args.grad_accum))]
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                       calibration_data=data if source == "calibration" else None)
    stats = ds_bitter7.get_pruner(engine).stats
    forwards = args.window * args.grad_accum if source == "training" else 0
    for i, x in enumerate(data[:forwards]):  # steps 1 .. window; the event would follow the last
        x = x.to(args.device)
        engine.backward(engine(input_ids=x, labels=x).loss)
        if i < forwards - 1:
            engine.step()
    held = sum(s.xtx.numel() * 8 for recent in stats._recent.values() for _, s in recent)
    gpu_before, before = _gpu_peak_reset(torch), _reset_rss_peak()
    gathered = stats.gather()
    peak, gpu_growth = _status_kib("VmHWM"), _gpu_peak_growth(torch, gpu_before)
    returned = sum(s.second_moment.numel() * 8 for s in gathered.values())
    rows = sum(s.count for s in gathered.values()) // len(gathered)
    out = {"source": source, "held_mib": held / MIB, "returned_mib": returned / MIB,
           "gather_peak_growth_mib": (peak - before) * 1024 / MIB, "gather_gpu_peak_growth_mib": gpu_growth,
           "forwards": forwards, "rows": rows, "package": os.path.dirname(ds_bitter7.__file__)}
    if args.event:  # the event gathers again (for training, the window gather() above left in place)
        del gathered
        gpu_before, before = _gpu_peak_reset(torch), _reset_rss_peak()
        t0 = time.perf_counter()
        record = ds_bitter7.get_pruner(engine).prune_to(args.fraction)
        seconds = time.perf_counter() - t0
        out.update(event_seconds=seconds, event_peak_growth_mib=(_status_kib("VmHWM") - before) * 1024 / MIB,
                   event_gpu_peak_growth_mib=_gpu_peak_growth(torch, gpu_before),
                   compensation_seconds=record["compensation"]["seconds"], passes=record.get("stats_passes", 0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=4096, help="MLP width (F)")
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--num_batches", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--embd", type=int, default=64, help="model width (the out projection's outputs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--event", choices=["obs", "magnitude"], help="also time one pruning event with this score")
    p.add_argument("--layers_per_pass", type=int, default=0, help="F x F of this many layers per calibration "
                   "pass (0: all; only the calibration row is run)")
    p.add_argument("--fraction", type=float, default=0.75, help="of MLP neurons, with --event")
    p.add_argument("--out", default="stats_memory", help="results file stem, under benchmarks/results")
    args = p.parse_args()
    if args.layers_per_pass and not args.event:
        p.error("--layers_per_pass needs --event: gather() alone sums every layer's matrix")
    sys.path.append(ROOT)  # after PYTHONPATH: a ds_bitter7 there is the one measured
    sources = ("calibration",) if args.layers_per_pass else ("calibration", "training")
    rows = [spawn_ranks(measure, 1, (source, args), timeout=1800)[0] for source in sources]
    info = {"command": command_line(), "args": vars(args), "rows": rows}
    base = os.path.join(ROOT, "benchmarks", "results", args.out)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    gpu = args.device == "cuda"
    lines = [f"# F x F statistics memory ({args.layers} blocks, MLP width {args.width})", "",
             f"`{info['command']}`; one {'GPU' if gpu else 'CPU'} process per row; growth: the peak resident set during "
             "`gather()` (`VmHWM`, reset just before) minus the resident set before it"
             + ("; GPU: the allocated peak minus what was allocated before" if gpu else "")
             + (f"; event: `prune_to({args.fraction})` with score `{args.event}` and least squares, its own "
                "gather included" if args.event else "") + f". Package: `{rows[0]['package']}`.", "",
             "| source | forwards summed | rows per group | F x F held before gather | returned by gather "
             "| gather's peak RSS growth | growth / returned |"
             + (" gather's GPU peak growth |" if gpu else "")
             + (" event s | calibration passes | refit s | event's peak RSS growth | event's GPU peak growth |" if args.event else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + ("---:|---:|---:|---:|---:|" if args.event else "")]
    for r in rows:
        held = "-" if r["source"] == "calibration" else f"{r['held_mib']:.0f} MiB"  # summed inside gather
        line = (f"| {r['source']} | {r['forwards'] or args.num_batches} | {r['rows']} | {held} "
                f"| {r['returned_mib']:.0f} MiB | {r['gather_peak_growth_mib']:.0f} MiB "
                f"| {r['gather_peak_growth_mib'] / r['returned_mib']:.2f}x |")
        if gpu:
            line += f" {r['gather_gpu_peak_growth_mib']:.0f} MiB |"
        if args.event:
            on_gpu = f"{r['event_gpu_peak_growth_mib']:.0f} MiB" if gpu else "-"
            line += (f" {r['event_seconds']:.2f} | {r['passes']} | {r['compensation_seconds']:.2f} "
                     f"| {r['event_peak_growth_mib']:.0f} MiB | {on_gpu} |")
        lines.append(line)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
