"""Bias compensation of removed units (placeholder until issue 4 lands)."""

from __future__ import annotations


def add_missing_out_biases(model, config) -> None:
    raise NotImplementedError("bias compensation is not implemented yet")


def compensate(pruner, masks_before, stats, event) -> None:
    raise NotImplementedError("bias compensation is not implemented yet")
