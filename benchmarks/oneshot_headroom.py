#!/usr/bin/env python
"""Headroom of one-shot ``obs`` + least squares: what a better allocation or a trained refit would add.

On the dense checkpoints of ``benchmarks/oneshot.py`` (its ``--workdir``: ``dense_SEED`` folders),
one process per seed, MLP neurons only, with the one-shot benchmark's calibration blocks (train
split) and validation blocks:

- ``global``: the library's one-shot cell, ``obs`` + least squares at ``--sparsity``: the joint
  greedy order (``ds_bitter7.obs.removal_order``), its first units pruned, each ``c_proj`` refit
  on the kept units (``ds_bitter7.least_squares.solve_update``).
- ``per layer``: every layer pruned by the same fraction, each by its own greedy.
- ``searched``: per-layer kept counts chosen on the calibration loss (coordinate descent from the
  ``global`` counts: move 64, 32, ..., 4 units between two layers while the loss drops), each
  layer's greedy prefix pruned and refit. Shows how far the greedy's allocation is from the best
  one the calibration data can find (the same within-layer orders).
- ``reconstructed``: the ``global`` cell, then each MLP's kept weights (``c_fc`` columns and
  biases, ``c_proj`` rows and bias) fitted by Adam to the dense MLP's outputs on its dense inputs
  over the calibration tokens: a non-linear refit of the whole MLP, no language-model loss. Shows
  what one-shot compensation could still gain beyond a linear refit of ``c_proj``.

Validation perplexity (never used for a choice) per seed; writes
``benchmarks/results/oneshot_headroom.{json,md}`` (``--out NAME``).

    python benchmarks/oneshot.py --workdir W            # the dense checkpoints (800 steps)
    python benchmarks/oneshot_headroom.py W             # then this, a few minutes per seed
    python benchmarks/oneshot_headroom.py W800 W2000    # several training lengths, one table each
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Dict, List

import oneshot as oneshot_bench  # benchmarks/oneshot.py: where its workdir keeps checkpoints and cells
import torch
from _common import ROOT, command_line
from transformers import AutoModelForCausalLM

from ds_bitter7 import data as dsdata
from ds_bitter7 import obs
from ds_bitter7.calibration import UnitStats
from ds_bitter7.checkpoint_files import consolidate, resolve_tag
from ds_bitter7.comm import LOCAL
from ds_bitter7.config import StructureName
from ds_bitter7.evaluation import perplexity
from ds_bitter7.export import load_config
from ds_bitter7.least_squares import solve_update
from ds_bitter7.structures import unit_groups
from ds_bitter7.threshold import n_to_prune

RESULTS = os.path.join(ROOT, "benchmarks", "results")
ROWS = ("global", "per layer", "searched", "reconstructed")
MOVES = (64, 32, 16, 8, 4)  # units moved between two layers per step of the allocation search


def load_dense(folder: str):
    """(fp32 GPT-2 with the checkpoint's weights, in eval mode; its training steps, from the tag)."""
    config, _ = load_config(folder)
    if config.model_type != "gpt2":  # the reconstruction and the c_proj layout are GPT-2's
        raise SystemExit(f"{folder}: a {config.model_type} checkpoint; this benchmark takes the one-shot benchmark's GPT-2")
    tag = resolve_tag(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(consolidate(folder, tag), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"{folder}: not the benchmark's GPT-2 checkpoint (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    if not tag.startswith("global_step") or not tag[len("global_step"):].isdigit():
        raise SystemExit(f"{folder}: tag {tag!r} is not launch/train.py's global_stepN")
    return model.eval(), int(tag[len("global_step"):])


def token_loss(model, batches) -> float:
    """Mean next-token loss over ``batches`` (every batch the same shape)."""
    with torch.no_grad():
        return statistics.fmean(float(model(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in batches)


def mlp_stats(model, groups, batches) -> Dict[str, UnitStats]:
    """The statistics least squares and ``obs`` read, from one process's forwards."""
    sums = {g.key: [0, 0.0, 0.0] for g in groups}

    def hook(key):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = sums[key]
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.T @ x
        return pre

    handles = [model.get_submodule(g.out_module).register_forward_pre_hook(hook(g.key)) for g in groups]
    token_loss(model, batches)
    for h in handles:
        h.remove()
    out = {}
    for key, (n, s, xtx) in sums.items():
        mean, second = s / n, xtx / n
        out[key] = UnitStats(n, mean, (second.diagonal() - mean.square()).clamp(min=0.0), second)
    return out


class Refitter:
    """Prunes each layer's greedy prefix of a given length and refits its ``c_proj``; caches the
    refit weights per (layer, kept count)."""

    def __init__(self, model, groups, stats, orders: Dict[str, torch.Tensor], ridge: float):
        self.model, self.groups, self.stats, self.orders, self.ridge = model, groups, stats, orders, ridge
        self.dense = {g.key: (model.get_parameter(g.out_weight).detach().clone(),
                              model.get_parameter(g.out_bias).detach().clone()) for g in groups}
        self.cache: Dict[tuple, tuple] = {}

    def _weights(self, g, kept: int):
        if (g.key, kept) not in self.cache:
            w, b = (t.double() for t in self.dense[g.key])  # Conv1D: w is [F, out]
            removed = self.orders[g.key] < g.n_units - kept  # the first units of the greedy go
            keep_idx, rem_idx = (~removed).nonzero().flatten(), removed.nonzero().flatten()
            st = self.stats[g.key]
            cov = st.second_moment - torch.outer(st.mean, st.mean)
            d, db = solve_update(cov, st.mean, keep_idx, rem_idx, w[rem_idx], self.ridge)
            w = w.clone()
            w[keep_idx] += d
            w[rem_idx] = 0.0
            self.cache[(g.key, kept)] = (w.float(), (b + db).float(), ~removed)
        return self.cache[(g.key, kept)]

    def apply(self, kept: List[int]) -> Dict[str, torch.Tensor]:
        """Set the model to this allocation; returns the kept-unit masks."""
        masks = {}
        with torch.no_grad():
            for g, k in zip(self.groups, kept):
                w, b, masks[g.key] = self._weights(g, k)
                self.model.get_parameter(g.out_weight).copy_(w)
                self.model.get_parameter(g.out_bias).copy_(b)
        return masks


def search(refit: Refitter, start: List[int], batches) -> tuple:
    """Coordinate descent on the calibration loss over per-layer kept counts (same total)."""
    best = list(start)
    refit.apply(best)
    best_loss, evals = token_loss(refit.model, batches), 0
    n = [g.n_units for g in refit.groups]
    for step in MOVES:
        improved = True
        while improved:
            improved = False
            for i in range(len(best)):
                for j in range(len(best)):
                    if i == j or best[i] - step < 1 or best[j] + step > n[j]:
                        continue
                    cand = list(best)
                    cand[i] -= step
                    cand[j] += step
                    refit.apply(cand)
                    loss = token_loss(refit.model, batches)
                    evals += 1
                    if loss < best_loss - 1e-6:
                        best, best_loss, improved = cand, loss, True
    return best, evals


def mlp_io(dense, batches) -> List[tuple]:
    """Per block, (inputs, outputs) of the dense model's MLP over ``batches``, one row per token."""
    pairs: List[list] = [[] for _ in dense.transformer.h]

    def keeper(i):
        def keep(module, args, out):
            pairs[i].append((args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1])))
        return keep

    handles = [block.mlp.register_forward_hook(keeper(i)) for i, block in enumerate(dense.transformer.h)]
    token_loss(dense, batches)
    for h in handles:
        h.remove()
    return [tuple(torch.cat(t) for t in zip(*p)) for p in pairs]


def fit_mlp(mlp, keep: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> dict:
    """Fit a pruned GPT-2 MLP's kept weights (``keep``: its kept neurons) to ``y`` from ``x`` by Adam."""
    params = [mlp.c_fc.weight.detach()[:, keep].clone(), mlp.c_fc.bias.detach()[keep].clone(),
              mlp.c_proj.weight.detach()[keep].clone(), mlp.c_proj.bias.detach().clone()]
    for p in params:
        p.requires_grad_(True)
    w1, b1, w2, b2 = params

    def mse():
        return (mlp.act(x @ w1 + b1) @ w2 + b2 - y).square().mean()

    opt = torch.optim.Adam(params, lr=lr)
    before = float(mse())
    for _ in range(steps):
        opt.zero_grad()
        loss = mse()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mlp.c_fc.weight[:, keep] = w1
        mlp.c_fc.bias[keep] = b1
        mlp.c_proj.weight[keep] = w2
        mlp.c_proj.bias.copy_(b2)
    return {"mse_before": before, "mse_after": float(mse())}


def reconstruct(model, dense, masks: Dict[str, torch.Tensor], batches, steps: int, lr: float) -> List[dict]:
    """Fit each pruned GPT-2 MLP's kept weights to the dense MLP's outputs on the dense MLP's inputs."""
    out = []
    for i, (block, (x, y)) in enumerate(zip(model.transformer.h, mlp_io(dense, batches))):
        keep = masks[f"layers.{i}.mlp"].nonzero().flatten()
        out.append({"layer": i, **fit_mlp(block.mlp, keep, x, y, steps, lr)})
    return out


def seed_data(args, seed: int) -> tuple:
    """(the union of the one-shot benchmark's 2 ranks' calibration batches of ``seed``, train split;
    a loader of the validation blocks, of which the one-shot runs read ``2 * eval_batches``)."""
    tok = dsdata.get_tokenizer(None)
    blocks = dsdata.chunk_dataset(dsdata.builtin_dataset("train"), tok, args.seq_len)
    # each rank takes every other block: one process takes both ranks' batches
    calib = dsdata.calibration_batches(blocks, args.batch_size, 2 * args.num_batches, seed, rank_aware=False)
    val_blocks = dsdata.chunk_dataset(dsdata.builtin_dataset("validation"), tok, args.seq_len)
    return calib, dsdata.make_dataloader(val_blocks, args.batch_size, shuffle=False, world_size=1, rank=0,
                                         drop_last=False)


def workdir_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The arguments of a script that reads ``benchmarks/oneshot.py``'s workdirs (its dense
    checkpoints, calibration and validation set-up); ``parse_workdir_args`` checks them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("workdirs", nargs="+", help="--workdir folders of benchmarks/oneshot.py (dense_SEED inside)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_batches", type=int, default=8, help="calibration batches per rank of the one-shot run")
    p.add_argument("--eval_batches", type=int, default=16, help="validation batches per rank of the one-shot run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=out)
    p.add_argument("--results", default=RESULTS, help="folder of the .json/.md written")
    return p


def parse_workdir_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    for w in args.workdirs:
        for s in args.seeds:
            if not os.path.isfile(os.path.join(oneshot_bench.dense_folder(w, s), "latest")):
                p.error(f"{w}: no dense checkpoint dense_{s} (run `python benchmarks/oneshot.py --workdir {w}` first)")
    return args


def run_seed(workdir: str, seed: int, args) -> dict:
    t0 = time.perf_counter()
    folder = oneshot_bench.dense_folder(workdir, seed)
    torch.manual_seed(seed)
    model, steps = load_dense(folder)
    dense = copy.deepcopy(model)
    calib, val = seed_data(args, seed)
    n_val = 2 * args.eval_batches
    groups = unit_groups(model, [StructureName.mlp_neuron])
    stats = mlp_stats(model, groups, calib)
    masks = {g.key: torch.ones(g.n_units, dtype=torch.bool) for g in groups}
    joint = obs.removal_order(groups, model, stats, masks, args.ridge, fraction=args.sparsity, min_keep=1)
    own = obs.removal_order(groups, model, stats, masks, args.ridge, per_layer=True)
    total = sum(g.n_units for g in groups)
    cut = n_to_prune(args.sparsity, total)
    kept = {"global": [int((joint[g.key] >= cut).sum()) for g in groups],
            "per layer": [g.n_units - n_to_prune(args.sparsity, g.n_units) for g in groups]}
    refit = Refitter(model, groups, stats, own, args.ridge)
    result = {"seed": seed, "steps": steps, "dense_ppl": perplexity(model, val, n_val, LOCAL), "kept": kept,
              "ppl": {}, "calibration_loss": {}}
    kept["searched"], result["search_evals"] = search(refit, kept["global"], calib)
    for row in ("global", "per layer", "searched"):
        refit.apply(kept[row])
        result["ppl"][row] = perplexity(model, val, n_val, LOCAL)
        result["calibration_loss"][row] = token_loss(model, calib)
    final = refit.apply(kept["global"])
    kept["reconstructed"] = kept["global"]
    result["reconstruction"] = reconstruct(model, dense, final, calib, args.recon_steps, args.lr)
    result["ppl"]["reconstructed"] = perplexity(model, val, n_val, LOCAL)
    result["calibration_loss"]["reconstructed"] = token_loss(model, calib)
    result["oneshot_cell"] = oneshot_cell(workdir, seed, args.sparsity)
    result["seconds"] = time.perf_counter() - t0
    print(f"{folder}: dense {result['dense_ppl']:.3f} "
          + " ".join(f"{r} {result['ppl'][r]:.3f} {kept[r]}" for r in ROWS), flush=True)
    return result


def oneshot_cell(workdir: str, seed: int, sparsity: float):
    """The 2-rank one-shot benchmark's ``obs`` + least-squares perplexity on this seed's checkpoint,
    when ``workdir`` holds its global cells (the ``global`` row should reproduce it), else None."""
    path = oneshot_bench.cells_file(workdir, seed, "global")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return next((c["ppl"] for c in json.load(f) if c["score"] == "obs" and c["sparsity"] == sparsity
                     and c["compensation"] == "least_squares"), None)


def markdown(results: List[dict], args, command: str) -> str:
    lines = ["# One-shot headroom: allocation and refit beyond obs + least squares", "",
             f"Command: `{command}`  ",
             f"MLP neurons, {args.sparsity:.0%} removed in one shot; one process per seed; calibration: the one-shot "
             f"benchmark's {2 * args.num_batches} train-split batches of {args.batch_size} x {args.seq_len} tokens; "
             f"validation: its {2 * args.eval_batches} batches. Reconstruction: {args.recon_steps} Adam steps, "
             f"lr {args.lr}, per MLP. Cells: validation perplexity, mean ± std over seeds (change vs `global`).", ""]
    for steps in sorted({r["steps"] for r in results}):
        rs = [r for r in results if r["steps"] == steps]
        dense = statistics.fmean(r["dense_ppl"] for r in rs)
        lines += [f"## Dense model trained {steps} steps (dense {dense:.3f}, seeds {[r['seed'] for r in rs]})", "",
                  "| allocation / refit | perplexity | vs dense | vs global | MLP neurons kept per layer |",
                  "|---|---:|---:|---:|---|"]
        for row in ROWS:
            ppl = [r["ppl"][row] for r in rs]
            spread = f" ± {statistics.stdev(ppl):.2f}" if len(ppl) > 1 else ""
            change = statistics.fmean(r["ppl"][row] / r["ppl"]["global"] - 1 for r in rs)
            counts = "; ".join(str(r["kept"][row]) for r in rs)
            lines.append(f"| {row} | {statistics.fmean(ppl):.3f}{spread} | "
                         f"{statistics.fmean(ppl) / dense - 1:+.1%} | {change:+.1%} | {counts} |")
        pairs = [(r["ppl"]["global"], r["oneshot_cell"]) for r in rs if r["oneshot_cell"] is not None]
        if pairs:
            lines += ["", f"`global` against the 2-rank one-shot benchmark's `obs` + least-squares cell on the same "
                      f"checkpoints ({len(pairs)} seed(s)): largest relative difference "
                      f"{max(abs(a / b - 1) for a, b in pairs):.1e}."]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = workdir_parser(__doc__.split("\n\n")[0], "oneshot_headroom")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--recon_steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    return parse_workdir_args(p, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(argv)
    results = [run_seed(w, s, args) for w in args.workdirs for s in args.seeds]
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, args.out)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"command": command, "args": vars(args), "results": results}, f, indent=2)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(results, args, command) + "\n")
    print(f"wrote {base}.md")


if __name__ == "__main__":
    main()
