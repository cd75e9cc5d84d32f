"""Argument checks shared by the launch scripts (``launch/train.py``, ``launch/train_hf_trainer.py``):
made before any work, so a bad value fails in a second, not after a model load or a training run."""

from __future__ import annotations

import argparse
import os
from typing import Sequence, Tuple

from .modeling import parse_overrides


def check_launch_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      minimums: Sequence[Tuple[str, int]]) -> None:
    """``parser.error`` (exit 2, usage shown) for an argument below its minimum (``(name, least)``),
    a ``--model_overrides`` that is no JSON object (else parsed in place) or a ``--summary`` folder."""
    for key, least in minimums:
        if getattr(args, key) < least:
            parser.error(f"--{key} must be >= {least}, got {getattr(args, key)}")
    try:
        args.model_overrides = parse_overrides(args.model_overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.summary and os.path.isdir(args.summary):
        parser.error(f"--summary {args.summary!r} is a folder: name a file")  # else found after training
