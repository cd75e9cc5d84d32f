"""Validation loss of a causal LM over every rank's share of the batches (training and one-shot)."""

from __future__ import annotations

import math

import torch

from .comm import Communicator


@torch.no_grad()
def token_loss(model, loader, n_batches: int, comm: Communicator) -> float:
    """Mean token loss over the first ``n_batches`` batches of every rank's loader, weighted by
    tokens over all ranks (a short last batch counts by its tokens). ``model``: a module or a
    DeepSpeed engine. Collective."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, tokens]
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        ids = batch["input_ids"].to(device)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total[0] += float(model(input_ids=ids, labels=ids).loss.double()) * n
        total[1] += n
    total = comm.all_reduce_sum(total)
    model.train(was)
    return float(total[0] / total[1].clamp(min=1))


def perplexity_of(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` (an untrained or broken model's loss)."""
    return math.exp(min(loss, 50.0))


def perplexity(model, loader, n_batches: int, comm: Communicator) -> float:
    """Token-weighted validation perplexity over every rank's share (``token_loss``). Collective."""
    return perplexity_of(token_loss(model, loader, n_batches, comm))
