"""Run a function on N emulated ranks: spawned CPU processes, gloo, a hard timeout.

``run_distributed(fn, world_size, *args)`` returns every rank's return value (rank order) or
raises with the failing rank's traceback. ``fn`` must be a module-level function.
"""

from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

from ds_bitter7.comm import free_port

DEFAULT_TIMEOUT = 240


def _worker(fn, rank: int, world_size: int, port: int, args, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu",
                       "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    try:
        import deepspeed
        import torch

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        # Plain pickle (by value): torch's queue reducers would share memory with a dying process.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


_CTX = None


def _context():
    """A fork server that imports torch, deepspeed and transformers once; ranks fork from it.

    The server never runs torch code, so forking it is safe, and each rank starts in a fraction of
    the seconds a fresh interpreter needs for these imports.
    """
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "deepspeed", "transformers", "ds_bitter7", "workers"])
    return _CTX


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return their results in rank order."""
    ctx = _context()
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s "
                                   f"(finished: {sorted(results)}, failed: {sorted(errors)})")
            if queue.empty():
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs) and queue.empty():
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
                    raise RuntimeError(f"rank(s) {dead} of {fn.__name__} died without a result")
                time.sleep(0.05)  # polling the queue, not timing anything
                continue
            rank, ok, value = queue.get()
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors[rank] = value
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
