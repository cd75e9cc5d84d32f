"""Activation statistics per unit (placeholder until issue 4 lands)."""

from __future__ import annotations

from typing import Dict

import torch


class ActivationStats:
    """Mean and variance of every unit's activation, gathered across ranks."""

    def __init__(self, pruner, calibration_data=None):
        raise NotImplementedError("activation statistics are not implemented yet")

    def gather(self) -> Dict[str, object]:
        """Collective: every rank must call this, in the same order."""
        raise NotImplementedError


def unit_std(group, stats) -> torch.Tensor:
    raise NotImplementedError
