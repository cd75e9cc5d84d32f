"""Overhead of ds_bitter7 during ZeRO-2 training: event time, mask upkeep, bytes, extra memory.

    python benchmarks/overhead.py [--world-sizes 1,2,4] [--widths 256,512,768] [--layers 2]
                                  [--repeats 4] [--seq 128] [--micro-batch 2] [--quick]
                                  [--out benchmarks/results]

For each world size, N ranks are spawned once (gloo on CPU; NCCL on CUDA) and every width is
measured inside them, one after the other. A width ``d`` is a GPT-2 block shape: n_embd d,
n_head d/64, n_inner 4d (d=768 is GPT-2 small's block), ``--layers`` blocks, a small vocabulary
(``--vocab``: a smaller LM head makes the step cheaper, so every ratio to the step is pessimistic),
sequence ``--seq`` (128), micro batch ``--micro-batch`` (2) per rank, ZeRO stage 2, AdamW; fp32
on CPU, bf16 on CUDA. The pruner scores ``mlp_neuron`` and ``attention_head`` with bitter7, bias
compensation off (the event measured is scoring + all-reduce + selection + masking). Per width, in the same processes:

(a) step: median time of forward+backward+engine.step with the pruner attached, before any event;
(b) event: median wall time of ``pruner.prune_to(f)`` over ``--repeats`` events (f rising to 0.5);
(c) masks: steps with masks active, with the pruner's hooks removed, and with empty drop masks,
    interleaved round by round (rotating order) so machine noise hits all three; plus the masking
    work itself (every ``_apply_drop`` call inside real optimizer steps, summed per step), median of
    10 steps. The target uses the hook time; the paired step differences are a check;
(d) bytes: ``event["bytes"]`` (handed to all-reduce by one rank) vs a full gather of exp_avg_sq of
    the scored parameters, 4 bytes x their element count, and at GPT-2 124M shapes from formulas;
(e) memory: the largest extra allocation during one more event (CPU: torch.profiler memory events,
    peak of the running sum; CUDA: max_memory_allocated) vs this rank's fp32 partition in bytes.

Writes overhead.json, overhead.md and overhead_scaling.png in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from _common import spawn_ranks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET = 0.5
TARGETS = {"event_over_step": 1.0, "masks_over_step": 0.03, "gather_over_event_bytes_124m": 1000.0,
           "peak_over_partition": 1.0}
GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab=50257, n_positions=1024)


# -- shapes and formulas -------------------------------------------------------------------------------
def scored_params(n_layer: int, d: int, n_inner: int) -> int:
    """Elements of the parameters that carry units: c_attn, attn.c_proj, c_fc, mlp.c_proj (+ biases)."""
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * n_inner + n_inner) + (n_inner * d + d)
    return n_layer * per_layer


def gpt2_params(n_layer: int, d: int, n_inner: int, vocab: int, n_positions: int) -> int:
    """All elements of a GPT-2 LM (tied head): embeddings, blocks, final layer norm."""
    per_layer = scored_params(1, d, n_inner) + 4 * d  # + two layer norms
    return vocab * d + n_positions * d + n_layer * per_layer + 2 * d


def event_bytes(n_layer: int, n_head: int, n_inner: int) -> int:
    """Bytes one rank hands to all-reduce in one event: per kind, one float64 per unit and one
    int32 error flag (``raise_if_any``)."""
    return 8 * n_layer * n_inner + 8 * n_layer * n_head + 2 * 4


def gpt2_124m_bytes() -> dict:
    g = GPT2_124M
    ev = event_bytes(g["n_layer"], g["n_head"], g["n_inner"])
    full = 4 * gpt2_params(g["n_layer"], g["n_embd"], g["n_inner"], g["vocab"], g["n_positions"])
    scored = 4 * scored_params(g["n_layer"], g["n_embd"], g["n_inner"])
    # On the wire (ring algorithms, per rank): all-reduce sends 2 (W-1)/W x its buffer, all-gather
    # (W-1)/W x the gathered tensor, so the traffic ratio is half the buffer ratio.
    return {"event_bytes": ev, "full_gather_bytes_all_params": full, "full_gather_bytes_scored": scored,
            "ratio_all_params": full / ev, "ratio_scored": scored / ev,
            "wire_ratio_all_params": full / (2 * ev), "wire_ratio_scored": scored / (2 * ev),
            "formula": "event = 8 B x (12 x 3072 neurons + 12 x 12 heads) + 2 x 4 B flags; "
                       "full gather = 4 B x elements (all 124M params, or only the scored layers)"}


# -- one rank --------------------------------------------------------------------------------------------
def _sync(acc) -> None:
    acc.synchronize()


def _ds_config(on_cuda: bool, micro_batch: int = 2) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
           "steps_per_print": 10**9, "zero_optimization": {"stage": 2, "overlap_comm": False},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
           "bitter7": {"enabled": True, "score": "bitter7", "structures": ["mlp_neuron", "attention_head"],
                       "target_sparsity": TARGET, "scope": "global",
                       "schedule": {"start_step": 10**9, "end_step": 10**9, "frequency": 1},
                       "bias_compensation": {"enabled": False}}}
    if on_cuda:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _step_timer(engine, acc, opts: dict, seed: int):
    import torch
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)

    def step() -> float:
        x = torch.randint(0, opts["vocab"], (opts["micro_batch"], opts["seq"]), generator=g).to(engine.device)
        dist.barrier()
        _sync(acc)
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        _sync(acc)
        return time.perf_counter() - t0
    return step


def _set_variant(pruner, variant: str, drop: dict) -> None:
    """'masks': hooks on, drop masks active; 'empty': hooks on, nothing to drop; 'none': no hooks."""
    if variant == "none":
        for h in pruner._hooks:
            h.remove()
        pruner._hooks = []
        return
    if not pruner._hooks:
        pruner._hooks = pruner.access.register_step_hooks(pruner._pre_step, pruner._post_step)
    pruner._drop = drop if variant == "masks" else {}


def _interleaved(pruner, step, variants, repeats: int) -> dict:
    drop = pruner._drop
    times = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no fixed position
        for v in order:
            _set_variant(pruner, v, drop)
            times[v].append(step())
    _set_variant(pruner, "masks", drop)
    return times


def _hook_seconds(pruner, acc, step, n: int = 10) -> float:
    """Median per-step time of the pruner's mask upkeep, timed inside real optimizer steps
    (the gradients it zeroes exist only there): every ``_apply_drop`` call is timed."""
    spent = []
    original = pruner._apply_drop

    def timed(*args, **kwargs):
        _sync(acc)
        t0 = time.perf_counter()
        original(*args, **kwargs)
        _sync(acc)
        spent.append(time.perf_counter() - t0)

    pruner._apply_drop = timed
    per_step = []
    try:
        for _ in range(n):
            spent.clear()
            step()
            per_step.append(sum(spent))
    finally:
        del pruner._apply_drop  # back to the class's method
    return statistics.median(per_step)


def _peak_extra_bytes(fn, acc, on_cuda: bool) -> int:
    """Largest extra memory allocated while ``fn`` runs (above what was allocated before)."""
    import torch

    if on_cuda:
        _sync(acc)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(acc)
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]")
    return int(max([0, *itertools.accumulate(n for _, n in mem)]))


def measure_width(width: int, opts: dict) -> dict:
    """Every figure for one width on this rank (collective: all ranks run it together)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    import ds_bitter7

    acc = deepspeed.get_accelerator()
    on_cuda = acc.device_name() == "cuda"
    n_head, n_inner, layers = max(1, width // 64), 4 * width, opts["layers"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=n_head, n_inner=n_inner,
                                       vocab_size=opts["vocab"], n_positions=opts["seq"], resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    n_params = sum(p.numel() for p in model.parameters())
    engine, *_ = ds_bitter7.initialize(model=model, model_parameters=model.parameters(),
                                       config=_ds_config(on_cuda, opts["micro_batch"]))
    pruner = ds_bitter7.get_pruner(engine)
    step = _step_timer(engine, acc, opts, seed=1000 * dist.get_rank() + width)
    reps = opts["repeats"]
    for _ in range(2):
        step()  # warm-up; also creates Adam's exp_avg_sq
    base = [step() for _ in range(reps)]
    fractions = [TARGET * (i + 1) / (reps + 1) for i in range(reps + 1)]
    ev_times, ev_bytes = [], []
    for f in fractions[:-1]:
        dist.barrier()
        _sync(acc)
        t0 = time.perf_counter()
        ev = pruner.prune_to(f)
        _sync(acc)
        ev_times.append(time.perf_counter() - t0)
        ev_bytes.append(ev["bytes"])
    dist.barrier()
    peak = _peak_extra_bytes(lambda: pruner.prune_to(fractions[-1]), acc, on_cuda)
    flats = getattr(pruner.access, "_flats", None) or [f.flat for f in pruner.access.fragments.values()]
    partition = sum(t.numel() * t.element_size() for t in flats)
    mixed = _interleaved(pruner, step, ["none", "empty", "masks"], reps)
    hook = _hook_seconds(pruner, acc, step)
    paired = [m - n for m, n in zip(mixed["masks"], mixed["none"])]
    out = {"width": width, "layers": layers, "n_head": n_head, "n_inner": n_inner, "params": n_params,
           "scored_params": scored_params(layers, width, n_inner), "step_times": base,
           "event_times": ev_times, "event_bytes": ev_bytes, "peak_extra_bytes": peak,
           "partition_bytes": partition, "mixed_step_times": mixed, "hook_seconds": hook,
           "paired_mask_minus_none": paired, "sparsity": pruner.last_event["sparsity"],
           "device": acc.device_name(), "dtype": "bf16" if on_cuda else "fp32"}
    return out


def _worker(rank: int, world: int, backend: str, opts: dict) -> list:
    import deepspeed
    import torch

    if torch.cuda.is_available():  # ranks share the GPUs when there are fewer
        os.environ["LOCAL_RANK"] = str(rank % torch.cuda.device_count())
    torch.set_num_threads(opts["threads"])
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if deepspeed.get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    rows = []
    for w in opts["widths"]:
        rows.append(measure_width(w, opts))
        gc.collect()  # the engine of the last width goes before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def run_world(world: int, backend: str, opts: dict, timeout: float) -> list:
    """Spawn ``world`` ranks, measure every width there; every rank's rows, in rank order."""
    return spawn_ranks(_worker, world, (backend, opts), timeout)


# -- summary -------------------------------------------------------------------------------------------
def _med(xs) -> float:
    return float(statistics.median(xs))


def _slowest(per_rank, key: str) -> list:
    """Per timed repeat, the slowest rank's time."""
    return [max(xs) for xs in zip(*(r[key] for r in per_rank))]


def summarize(world: int, ranks: list) -> list:
    """One row per width: rank 0's sizes, the slowest rank per timed step, ratios to the step."""
    rows = []
    for per_rank in zip(*ranks):
        r0 = per_rank[0]
        mixed = {v: [max(xs) for xs in zip(*(r["mixed_step_times"][v] for r in per_rank))]
                 for v in r0["mixed_step_times"]}
        step, event = _med(_slowest(per_rank, "step_times")), _med(_slowest(per_rank, "event_times"))
        hook = max(r["hook_seconds"] for r in per_rank)
        paired = _med([m - n for m, n in zip(mixed["masks"], mixed["none"])])
        full_gather = 4 * r0["scored_params"]
        ev_bytes = max(r0["event_bytes"])
        peak = max(r["peak_extra_bytes"] for r in per_rank)
        partition = min(r["partition_bytes"] for r in per_rank)
        rows.append({
            "world_size": world, "width": r0["width"], "layers": r0["layers"], "params": r0["params"],
            "scored_params": r0["scored_params"], "device": r0["device"], "dtype": r0["dtype"],
            "step_s": step, "event_s": event, "event_over_step": event / step,
            "hook_s": hook, "masks_over_step": hook / step,
            "step_none_s": _med(mixed["none"]), "step_empty_s": _med(mixed["empty"]),
            "step_masks_s": _med(mixed["masks"]), "paired_masks_minus_none_s": paired,
            "paired_over_step": paired / step,
            "event_bytes": ev_bytes,
            "event_bytes_formula": event_bytes(r0["layers"], r0["n_head"], r0["n_inner"]) if world > 1 else 0,
            "full_gather_bytes": full_gather,
            "gather_over_event_bytes": (full_gather / ev_bytes) if ev_bytes else None,
            "peak_extra_bytes": peak, "partition_bytes": partition, "peak_over_partition": peak / partition,
            "sparsity_after": r0["sparsity"], "raw": per_rank[0]})
    return rows


def machine() -> dict:
    import deepspeed
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"nproc": os.cpu_count(), "cpu": cpu, "loadavg_1min_at_end": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["nproc"] = int(subprocess.check_output(["nproc"], text=True).strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    return info


def verdicts(rows: list, ref: dict) -> dict:
    worst = {k: max(r[k] for r in rows) for k in ("event_over_step", "masks_over_step", "peak_over_partition")}
    out = {k: {"worst": v, "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in worst.items()}
    r = ref["ratio_scored"]
    out["gather_over_event_bytes_124m"] = {"worst": r, "target": TARGETS["gather_over_event_bytes_124m"],
                                           "met": r >= TARGETS["gather_over_event_bytes_124m"],
                                           "all_params_ratio": ref["ratio_all_params"]}
    return out


def write_markdown(path: str, doc: dict) -> None:
    m, v, ref = doc["machine"], doc["verdicts"], doc["gpt2_124m"]
    lines = ["# ds_bitter7 overhead during ZeRO-2 training", "",
             f"Command: `{doc['command']}`  ", f"Machine: {m['nproc']} CPU cores ({m['cpu']})"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + f"; torch {m['torch']}, deepspeed {m['deepspeed']}, Python {m['python']}; "
             f"{doc['options']['threads']} torch thread(s) per rank, load average at the end "
             f"{m['loadavg_1min_at_end']:.1f}  ",
             f"Model: GPT-2 blocks (n_head = width/64, n_inner = 4 x width), {doc['options']['layers']} layers, "
             f"vocab {doc['options']['vocab']}, seq {doc['options']['seq']}, micro batch {doc['options']['micro_batch']} "
             "per rank, ZeRO-2, AdamW; "
             "pruner on mlp_neuron + attention_head, no bias compensation. Medians over "
             f"{doc['options']['repeats']} repeats; per step the slowest rank.", "",
             "| ranks | width | params | step s | event s | event/step | mask hook s | masks/step "
             "| paired step diff/step | bytes/event | full gather / event | peak extra MB | partition MB "
             "| peak/partition |", "|" + "---|" * 14]
    for r in doc["rows"]:
        gather = f"{r['gather_over_event_bytes']:.0f}x" if r["gather_over_event_bytes"] else "n/a (1 rank)"
        lines.append(f"| {r['world_size']} | {r['width']} | {r['params'] / 1e6:.1f}M | {r['step_s']:.3f} "
                     f"| {r['event_s']:.4f} | {r['event_over_step']:.3f} | {r['hook_s'] * 1e3:.2f} ms "
                     f"| {100 * r['masks_over_step']:.2f}% | {100 * r['paired_over_step']:+.1f}% "
                     f"| {r['event_bytes']} | {gather} | {r['peak_extra_bytes'] / 2**20:.1f} "
                     f"| {r['partition_bytes'] / 2**20:.1f} | {r['peak_over_partition']:.3f} |")
    lines += ["", "## Targets (worst row)", "",
              "| target | worst | limit | met |", "|---|---|---|---|"]
    names = {"event_over_step": "event time / step time", "masks_over_step": "mask upkeep / step time",
             "peak_over_partition": "event extra peak memory / local fp32 partition",
             "gather_over_event_bytes_124m": "full gather bytes / event bytes at GPT-2 124M (scored layers)"}
    for k, name in names.items():
        op = ">=" if k.startswith("gather") else "<="
        lines.append(f"| {name} | {v[k]['worst']:.4g} | {op} {v[k]['target']:g} | {'yes' if v[k]['met'] else 'NO'} |")
    lines += ["", f"GPT-2 124M from the shapes: {ref['formula']}. Event {ref['event_bytes']} B; full gather "
              f"{ref['full_gather_bytes_scored']} B (scored layers, ratio {ref['ratio_scored']:.0f}x) or "
              f"{ref['full_gather_bytes_all_params']} B (all params, ratio {ref['ratio_all_params']:.0f}x). Counting "
              "ring traffic on the wire instead (all-reduce sends 2 (W-1)/W x its buffer per rank, all-gather "
              f"(W-1)/W x the tensor) the ratios halve: {ref['wire_ratio_scored']:.0f}x (scored layers), "
              f"{ref['wire_ratio_all_params']:.0f}x (all params).", "",
              "Mask upkeep is the pruner's masking work timed inside real optimizer steps (what it adds to every step); "
              "'paired step diff' is the median of (step with masks - step without hooks) over interleaved "
              "rounds, a noisy check of the same cost. Full gather / event at the benchmark shapes: "
              "4 B x scored elements over the bytes one rank hands to all-reduce.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("event_over_step", "event time / step time"), ("masks_over_step", "mask upkeep / step time"),
              ("event_bytes", "bytes all-reduced per event (one rank)")]
    for ax, (key, title) in zip(axes, panels):
        for i, world in enumerate(sorted({r["world_size"] for r in rows})):
            rs = sorted((r for r in rows if r["world_size"] == world), key=lambda r: r["params"])
            ax.plot([r["params"] / 1e6 for r in rs], [r[key] for r in rs], marker="osD^v"[i % 5],
                    ls=["-", "--", ":"][i % 3], label=f"{world} rank(s)")  # equal lines stay visible
        ax.set_xlabel("model parameters (millions)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].axhline(TARGETS["event_over_step"], color="r", ls="--", lw=0.8)
    axes[1].axhline(TARGETS["masks_over_step"], color="r", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-sizes", default="1,2,4")
    p.add_argument("--widths", default="256,512,768", help="n_embd values (n_inner = 4x, n_head = /64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank and step")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--backend", default="auto", help="auto (nccl on CUDA, gloo on CPU) | gloo | nccl")
    p.add_argument("--timeout", type=float, default=480, help="seconds per world size")
    p.add_argument("--quick", action="store_true", help="world sizes 1,2; widths 256,768; 1 layer; 3 repeats")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--from-json", help="only re-render overhead.md and the plot from this overhead.json")
    args = p.parse_args(argv)
    if args.quick:
        args.world_sizes, args.widths, args.layers, args.repeats = "1,2", "256,768", 1, 3
    args.world_sizes = [int(x) for x in str(args.world_sizes).split(",")]
    args.widths = [int(x) for x in str(args.widths).split(",")]
    return args


def render(out: str, doc: dict) -> None:
    """Write overhead.json, overhead.md and overhead_scaling.png for ``doc`` into ``out``."""
    doc["gpt2_124m"] = gpt2_124m_bytes()
    doc["verdicts"] = verdicts(doc["rows"], doc["gpt2_124m"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(doc, f, indent=1)
    write_markdown(os.path.join(out, "overhead.md"), doc)
    plot(os.path.join(out, "overhead_scaling.png"), doc["rows"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:  # re-render the tables and the plot of an earlier run
        with open(args.from_json) as f:
            doc = json.load(f)
        doc["options"].setdefault("threads", 1)
        doc["machine"].setdefault("loadavg_1min_at_end", float("nan"))
        render(os.path.dirname(os.path.abspath(args.from_json)), doc)
        return doc
    import torch

    if not torch.cuda.is_available():  # the spawned ranks inherit these
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    opts = {"threads": args.threads, "widths": args.widths, "layers": args.layers, "vocab": args.vocab, "repeats": args.repeats,
            "seq": args.seq, "micro_batch": args.micro_batch}
    rows, t0 = [], time.perf_counter()
    for world in args.world_sizes:
        rows += summarize(world, run_world(world, backend, opts, args.timeout))
        print(f"world size {world} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    doc = {"command": " ".join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]),
           "machine": machine(), "backend": backend, "options": {**opts, "world_sizes": args.world_sizes},
           "targets": TARGETS, "rows": rows, "total_seconds": time.perf_counter() - t0}
    render(args.out, doc)
    print(open(os.path.join(args.out, "overhead.md")).read())
    return doc


if __name__ == "__main__":
    main()
