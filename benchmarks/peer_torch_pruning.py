#!/usr/bin/env python
"""External peer for ``benchmarks/quality.py``: Torch-Pruning, one-shot, then fine-tuning.

The same workload as ``launch/train.py`` (same model init, data, per-step samples, optimizer,
learning-rate schedule, gradient clipping and validation blocks), in ONE process: each step
concatenates the micro-batches that ``--ranks`` DeepSpeed ranks would each draw, which gives the
same averaged gradient as data-parallel training. At ``--prune_step`` Torch-Pruning's
``MetaPruner`` with its group L2-magnitude importance removes ``--sparsity`` of the MLP neurons
(one global ranking over all layers, as ``scope: global``), physically shrinking the layers; a
new AdamW (Torch-Pruning does not carry optimizer state) with the linear learning-rate warm-up
restarted (``--rewarmup 1``, the default; without it the fresh AdamW at full learning rate
is unstable: in a first quick run its validation perplexity rose
from 35 to 79 within 30 steps) then fine-tunes for the remaining steps.

GPT-2's MLP uses ``transformers`` ``Conv1D`` (weight stored [in, out]), which Torch-Pruning's
dependency graph does not know, and tracing the whole HF model fails on the attention's concat.
So the MLP ``Conv1D`` layers are swapped for equivalent ``nn.Linear`` layers (exact, transposed
weights) and the dependency graph is built over the MLP blocks alone, with the output projections
ignored so that only the hidden neurons (``c_fc`` out / ``c_proj`` in) can be removed.

    python benchmarks/peer_torch_pruning.py --steps 100 --prune_step 20 --sparsity 0.5 \
        --summary /tmp/peer.json --curve /tmp/peer_val_ppl.csv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ds_bitter7 import data as dsdata  # noqa: E402
from ds_bitter7 import modeling  # noqa: E402


def _conv1d_to_linear(conv) -> torch.nn.Linear:
    """``transformers`` Conv1D (y = x @ W + b, W [in, out]) as an equal ``nn.Linear``."""
    n_in, n_out = conv.weight.shape
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


def mlp_blocks(model) -> Tuple[List[torch.nn.Module], List[torch.nn.Module]]:
    """(MLP modules, their output projections) for GPT-2 (Conv1D swapped for Linear) or LLaMA."""
    if model.config.model_type == "gpt2":
        mlps = [block.mlp for block in model.transformer.h]
        for mlp in mlps:
            mlp.c_fc, mlp.c_proj = _conv1d_to_linear(mlp.c_fc), _conv1d_to_linear(mlp.c_proj)
        return mlps, [mlp.c_proj for mlp in mlps]
    if model.config.model_type == "llama":
        mlps = [layer.mlp for layer in model.model.layers]
        return mlps, [mlp.down_proj for mlp in mlps]
    raise ValueError(f"peer supports gpt2 and llama, not {model.config.model_type!r}")


def hidden_size(model) -> int:
    return model.config.hidden_size


def count_neurons(model) -> int:
    """MLP neurons over all layers (GPT-2 Conv1D or swapped Linear, LLaMA Linear)."""
    if model.config.model_type == "gpt2":
        projs = [block.mlp.c_proj for block in model.transformer.h]
    else:
        projs = [layer.mlp.down_proj for layer in model.model.layers]
    # the output projection's input width: Conv1D weight [in, out], Linear weight [out, in]
    return sum(p.in_features if isinstance(p, torch.nn.Linear) else p.weight.shape[0] for p in projs)


def tp_prune_mlp(model, mlps: List[torch.nn.Module], outputs: List[torch.nn.Module], sparsity: float) -> int:
    """Remove ``sparsity`` of all MLP neurons with Torch-Pruning (global magnitude ranking); returns
    the neurons kept."""
    import torch_pruning as tp

    modules = torch.nn.ModuleList(mlps)
    example = torch.randn(1, 4, hidden_size(model))
    pruner = tp.pruner.MetaPruner(
        modules, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True, pruning_ratio=sparsity, ignored_layers=list(outputs),
        root_module_types=[torch.nn.Linear],
        # every MLP reads the same input; summing their outputs makes one traceable graph
        forward_fn=lambda mods, x: torch.stack([m(x) for m in mods]).sum(0))
    pruner.step()
    return count_neurons(model)


def _loaders(blocks, mb: int, ranks: int, shuffle: bool, seed: int, drop_last: bool):
    return [dsdata.make_dataloader(blocks, mb, shuffle=shuffle, seed=seed, world_size=ranks, rank=r,
                                   drop_last=drop_last) for r in range(ranks)]


@torch.no_grad()
def evaluate(model, val_loaders, n_batches: int) -> Tuple[float, float]:
    """launch/train.py's metric: mean over every rank's first ``n_batches`` batch losses."""
    model.eval()
    losses = []
    for loader in val_loaders:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            ids = batch["input_ids"]
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    model.train()
    loss = sum(losses) / max(len(losses), 1)
    return loss, math.exp(min(loss, 50.0))


def make_optimizer(model, args, last_iteration: int = -1):
    from deepspeed.runtime.lr_schedules import WarmupLR

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=args.lr, warmup_num_steps=args.warmup,
                     warmup_type="linear", last_batch_iteration=last_iteration)
    if last_iteration >= 0:
        sched.step(last_iteration)
    return opt, sched


def run(args) -> Dict:
    import deepspeed

    deepspeed.runtime.utils.set_random_seed(args.seed)
    tok = dsdata.get_tokenizer(None)
    train_ds, val_ds = dsdata.load_text_datasets(["builtin"], seed=args.seed)
    train_blocks = dsdata.chunk_dataset(train_ds, tok, args.seq_len)
    val_blocks = dsdata.chunk_dataset(val_ds, tok, args.seq_len)
    model = modeling.build_model(args.model, dsdata.tokenizer_vocab_size(tok),
                                 max_positions=max(args.seq_len, 256), seed=args.seed)
    n_total = count_neurons(model)
    train_iters = [dsdata.iterate_forever(lo) for lo in _loaders(train_blocks, args.micro_batch, args.ranks,
                                                                  True, args.seed, True)]
    val_loaders = _loaders(val_blocks, args.micro_batch, args.ranks, False, args.seed, False)
    opt, sched = make_optimizer(model, args)
    loss0, ppl0 = evaluate(model, val_loaders, args.eval_batches)
    curve = [(0, ppl0)]
    t0, kept = time.time(), n_total
    for step in range(1, args.steps + 1):
        ids = torch.cat([next(it)["input_ids"] for it in train_iters])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == args.prune_step:
            mlps, outs = mlp_blocks(model)
            kept = tp_prune_mlp(model, mlps, outs, args.sparsity)
            # a fresh AdamW at full learning rate is unstable here (its first steps are sign-like);
            # the usual fine-tuning recipe re-warms the learning rate, as at the start
            opt, sched = make_optimizer(model, args, last_iteration=-1 if args.rewarmup else sched.last_batch_iteration)
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            val_loss, ppl = evaluate(model, val_loaders, args.eval_batches)
            curve.append((step, ppl))
    summary = {"steps": args.steps, "ppl_start": ppl0, "loss_start": loss0, "ppl_final": curve[-1][1],
               "loss_final": val_loss, "seconds": time.time() - t0, "model": args.model,
               "sparsity": {"mlp_neuron": 1.0 - kept / n_total}, "neurons_kept": kept, "neurons_total": n_total,
               "params_after": sum(p.numel() for p in model.parameters()), "curve": curve,
               "peer": "torch_pruning " + _tp_version(), "ranks_simulated": args.ranks,
               "rewarmup": bool(args.rewarmup)}
    return summary


def _tp_version() -> str:
    import torch_pruning as tp

    return getattr(tp, "__version__", "?")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--prune_step", type=int, required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks simulated in one process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rewarmup", type=int, default=1, choices=[0, 1],
                   help="1: restart the linear warm-up with the new optimizer after pruning")
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--summary", required=True)
    p.add_argument("--curve", help="also write step,ppl here (csv_monitor's Val_ppl.csv format)")
    args = p.parse_args(argv)
    summary = run(args)
    with open(args.summary, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if args.curve:
        with open(args.curve, "w", encoding="utf-8") as f:
            f.write("step,ppl\n" + "".join(f"{s},{v}\n" for s, v in summary["curve"]))
    print(f"torch_pruning peer: val ppl {summary['ppl_start']:.2f} -> {summary['ppl_final']:.2f}, "
          f"MLP sparsity {summary['sparsity']['mlp_neuron']:.3f}")


if __name__ == "__main__":
    main()
