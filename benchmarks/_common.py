"""What the training benchmarks share: the environment of CPU runs, a logged subprocess, and the
reference workload's DeepSpeed config (ZeRO-2, AdamW, linear warm-up over the first 10%)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_line(argv: Optional[List[str]] = None) -> str:
    """The command that is running, as results files record it: ``python benchmarks/X.py ARGS``."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", script] + [shlex.quote(a) for a in args])


def cpu_env() -> dict:
    """The environment of a CPU run with gloo ranks (one thread per rank, quiet warnings)."""
    return dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")


def run_logged(cmd: List[str], log: str, timeout: int, what: str) -> None:
    """Run ``cmd`` from the repository root with its output in ``log``; on failure raise with the
    log's tail, naming ``what``."""
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, env=cpu_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        with open(log, encoding="utf-8") as f:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{f.read()[-4000:]}")


def warmup(steps: int) -> int:
    """Linear warm-up steps of the reference workload."""
    return max(2, steps // 10)


def reference_ds_config(steps: int, lr: float, micro_batch: int) -> dict:
    """The reference workload's DeepSpeed config, without a ``"bitter7"`` section."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                     "warmup_num_steps": warmup(steps),
                                                     "warmup_type": "linear"}},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    }
