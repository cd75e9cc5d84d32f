"""What the benchmarks share: the environment of CPU runs, a logged subprocess, ranks spawned in
one process group, and the reference workload's DeepSpeed config (ZeRO-2, AdamW, linear warm-up
over the first 10%)."""

from __future__ import annotations

import os
import pickle
import shlex
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, List, Optional

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


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    try:
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable, world: int, args: tuple, timeout: float) -> List[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes, with the ``env://`` variables of
    one process group set (``fn`` initializes it); their results in rank order. Raises when a rank
    fails (with its traceback) or the ranks take longer than ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks of {fn.__name__} did not finish in {timeout:.0f} s")
            if queue.empty():
                if any(p.exitcode not in (0, None) for p in procs):
                    raise RuntimeError(f"a rank of {world} died without a result in {fn.__name__}")
                time.sleep(0.1)  # polling the queue, not timing anything
                continue
            rank, ok, value = queue.get()
            if not ok:
                raise RuntimeError(f"rank {rank} of {world} failed in {fn.__name__}:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
