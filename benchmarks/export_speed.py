"""Dense vs exported (physically smaller) GPT-2: parameters, file size and CPU throughput.

    python benchmarks/export_speed.py [--layers 4] [--repeats 5] [--threads 2]

A GPT-2 small-shaped model (n_embd 768, n_head 12, n_inner 3072, vocab 50257; fewer layers to fit
the time) with random weights. MLP neurons are pruned per layer (scope: per_layer) by magnitude
(|c_fc column|_1 + |c_proj row|_1), 50% and 75%, then exported with `ds_bitter7.export.export_model`
and loaded back with plain `AutoModelForCausalLM.from_pretrained`. Throughput is the median of
`--repeats` timed prefill passes (logits of the last position only, as in generation) of a
4 x 256 token batch under `torch.inference_mode`, timed round-robin over the models after two
warm-ups. Writes benchmarks/results/export_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from _common import command_line
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ds_bitter7.export import export_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH, SEQ = 4, 256


def magnitude_masks(model: GPT2LMHeadModel, sparsity: float) -> dict:
    """Per layer, keep the (1 - sparsity) fraction of neurons with the largest L1 weight mass."""
    masks = {}
    for i, block in enumerate(model.transformer.h):
        score = block.mlp.c_fc.weight.abs().sum(0) + block.mlp.c_proj.weight.abs().sum(1)  # [n_inner]
        n = score.numel()
        keep = torch.topk(score, n - int(sparsity * n)).indices
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keep] = True
        masks[f"layers.{i}.mlp"] = mask
    return masks


def throughput(models: list, repeats: int, warmup: int = 2) -> list:
    """Median time of a prefill forward pass per model, timed round-robin so that machine noise
    hits every model alike. `logits_to_keep=1`, as in generation: the full [4, 256, 50257] fp32
    logits (823 MB) would make the timing mostly memory allocation."""
    ids = torch.randint(0, models[0].config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    times = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models:
                model(input_ids=ids, logits_to_keep=1)
        for _ in range(repeats):
            for model, record in zip(models, times):
                start = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                record.append(time.perf_counter() - start)
    return [{"median_s": statistics.median(t), "tokens_per_s": BATCH * SEQ / statistics.median(t),
             "best_tokens_per_s": BATCH * SEQ / min(t), "times_s": t} for t in times]


def mlp_params(model) -> int:
    return sum(p.numel() for b in model.transformer.h for p in b.mlp.parameters())


def describe(name: str, folder: str, sparsity: float):
    """(the model loaded back with plain from_pretrained, its row of the table)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, {"name": name, "sparsity": sparsity, "model_type": model.config.model_type,
                   "params": sum(p.numel() for p in model.parameters()), "mlp_params": mlp_params(model),
                   "file_bytes": os.path.getsize(os.path.join(folder, "model.safetensors"))}


def write_markdown(path: str, result: dict) -> None:
    lines = ["# Export speed: dense vs exported GPT-2 (CPU)", "", f"Command: `{result['command']}`", "",
             f"{result['setup']}", "",
             f"Load average (1 min) at the end: {result['load_average_1min_at_end']:.2f}. Speed-up is the ratio "
             "of median throughputs; the ratio of best times is given for reference.", "",
             "| model | MLP sparsity | params | MLP params | file MB | tokens/s (median) | speed-up | best-time speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['sparsity']:.0%} | {r['params']:,} | {r['mlp_params']:,} | "
                     f"{r['file_bytes'] / 2**20:.1f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['best_speedup']:.2f}x |")
    lines += ["", "MLP parameters fall by exactly the pruned fraction: "
              + ", ".join(f"{r['name']}: {r['mlp_fraction_removed']:.4f}" for r in result["rows"][1:])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="export_speed", help="results name under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_head=12, n_inner=3072, n_layer=args.layers, vocab_size=50257)
    dense = GPT2LMHeadModel(config).eval()
    loaded = []
    with tempfile.TemporaryDirectory() as tmp:
        dense.save_pretrained(os.path.join(tmp, "dense"))
        loaded.append(describe("dense", os.path.join(tmp, "dense"), 0.0))
        for sparsity in (0.5, 0.75):
            model = GPT2LMHeadModel(config).eval()
            model.load_state_dict(dense.state_dict())
            folder = os.path.join(tmp, f"sparse{int(sparsity * 100)}")
            export_model(model, magnitude_masks(model, sparsity), folder)
            loaded.append(describe(f"exported {sparsity:.0%}", folder, sparsity))
        rows = [row for _, row in loaded]
        for row, timing in zip(rows, throughput([m for m, _ in loaded], args.repeats)):
            row.update(timing)
    # c_proj.bias (n_embd per layer) belongs to no neuron; the fraction is over the neurons' weights
    unit_params = rows[0]["mlp_params"] - args.layers * config.n_embd
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["best_speedup"] = r["best_tokens_per_s"] / rows[0]["best_tokens_per_s"]
        r["mlp_fraction_removed"] = (rows[0]["mlp_params"] - r["mlp_params"]) / unit_params
    result = {"command": command_line(), "setup": (f"GPT-2 small shape (n_embd 768, n_head 12, n_inner 3072, vocab 50257), {args.layers} "
                        f"layers, random weights; per-layer magnitude masks on MLP neurons; batch {BATCH}x{SEQ} "
                        f"tokens (prefill, logits_to_keep=1), fp32, torch.inference_mode, {args.threads} threads, "
                        f"median of {args.repeats} round-robin repeats after 2 warm-ups; "
                        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"),
              "load_average_1min_at_end": os.getloadavg()[0], "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.out}.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(os.path.join(RESULTS, f"{args.out}.md"), result)
    for r in rows:
        print(f"{r['name']:>14}: params {r['params']:,}  MLP {r['mlp_params']:,}  file {r['file_bytes'] / 2**20:.1f} MB"
              f"  {r['tokens_per_s']:.0f} tok/s  x{r['speedup']:.2f} (best x{r['best_speedup']:.2f})  MLP removed {r['mlp_fraction_removed']:.4f}")


if __name__ == "__main__":
    main()
