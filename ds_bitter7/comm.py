"""The one module that calls collectives.

Every public function that communicates says so: *Collective: every rank must call this, in the
same order*. With torch.distributed not initialised, they are the identity, so one code path
serves 1 and N ranks. Bytes handed to collectives are counted (README, Guarantees 5).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import secrets
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def world_size_and_rank(group=None) -> Tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def free_port() -> int:
    """A TCP port free on this host now (for a one-rank group or a local launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stale_build_locks(max_age_s: float = 600.0) -> Dict[str, float]:
    """Lock files of torch JIT extension builds older than ``max_age_s``, with their ages in
    seconds. DeepSpeed builds its CPU communication op at its first start (a few minutes at most)
    under such a lock; a build killed on the way leaves the lock, and every later start waits on
    it, silently and for good."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        pattern = os.path.join(root, "*", "lock")
    else:
        from torch.utils.cpp_extension import get_default_build_root

        pattern = os.path.join(get_default_build_root(), "*", "*", "lock")
    ages = {}
    for path in sorted(glob.glob(pattern)):
        with contextlib.suppress(FileNotFoundError):  # a build that just ended
            ages[path] = time.time() - os.path.getmtime(path)
    return {path: age for path, age in ages.items() if age > max_age_s}


_SHM_RELEASED = False


def release_shm_buffers() -> None:
    """Unlink the names of DeepSpeed's CPU shared-memory all-reduce buffers.

    When every rank is on one node (the deepspeed launcher sets ``LOCAL_SIZE``), DeepSpeed's CPU
    backend gives each rank a 69 MB buffer, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    and never unlinks it: every run leaves its ranks' buffers in RAM until the machine restarts.
    Each rank maps all of them at start-up; after a barrier every rank has, so each unlinks its
    own name and the memory goes when the last rank exits, killed or not. Collective (once; a
    no-op where DeepSpeed makes no such buffers: other launchers, several nodes, NCCL; at one rank
    the deepspeed launcher still makes one)."""
    global _SHM_RELEASED
    world, rank = world_size_and_rank()
    if _SHM_RELEASED or os.environ.get("LOCAL_SIZE") != str(world) or dist.get_backend() == "nccl":
        return
    _SHM_RELEASED = True
    dist.barrier()
    name = "_".join(("deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(rank)))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def launched_by_mpi() -> bool:
    """Whether this process was started by mpirun (Open MPI, MVAPICH, or a PMI launcher such as
    MPICH's or ``srun --mpi=pmix``)."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def mpi_rank_and_size() -> Optional[Tuple[str, str]]:
    """(rank, world size) as the MPI launcher set them, where it names both, else None."""
    for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
                       ("PMI_RANK", "PMI_SIZE")):
        if rank in os.environ and size in os.environ:
            return os.environ[rank], os.environ[size]
    return None


# set by torchrun and by DeepSpeed's per-node launcher in the processes they start: their RANK is
# this process's, whatever MPI says (``srun --mpi=pmix torchrun``, ``mpirun -ppn 1 torchrun``)
PER_NODE_LAUNCHERS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")


def drop_stale_rank_env() -> None:
    """Under mpirun, unset ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` that disagree with MPI's own.

    Left in the environment from elsewhere (a shell inside another job), with ``MASTER_ADDR`` and
    ``MASTER_PORT`` they make DeepSpeed skip its MPI discovery: every process would take the same
    rank and world size, and the job fails (address in use) or hangs. Kept where a per-node
    launcher started this process under MPI (``PER_NODE_LAUNCHERS``).
    """
    ours = mpi_rank_and_size()
    if ours is None or any(k in os.environ for k in PER_NODE_LAUNCHERS):
        return
    stale = {k: os.environ[k] for k, v in zip(("RANK", "WORLD_SIZE"), ours) if k in os.environ and os.environ[k] != v}
    if stale:
        logger.warning("ignoring %s from the environment: mpirun started this process as rank %s of %s",
                       ", ".join(f"{k}={v}" for k, v in stale.items()), *ours)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)


def launch_rank() -> int:
    """This process's global rank as its launcher set it, before torch.distributed starts: under
    mpirun MPI's own (a ``RANK`` left from elsewhere is stale: ``drop_stale_rank_env``), else
    ``RANK`` (torchrun, the deepspeed launcher) or PMIx's; 0 when started alone."""
    ours = None if any(k in os.environ for k in PER_NODE_LAUNCHERS) else mpi_rank_and_size()
    for value in (ours[0] if ours else None, os.environ.get("RANK"), os.environ.get("PMIX_RANK")):
        if value is not None and value.isdigit():
            return int(value)
    return 0


def init_distributed() -> Tuple[int, int]:
    """Start torch.distributed: from the launcher's env (torchrun, the deepspeed launcher), from
    MPI (mpirun, through mpi4py), or as a one-rank group for a plain ``python``. Returns
    (world size, rank)."""
    import deepspeed

    if os.environ.get("LOCAL_RANK", "0") == "0":
        for lock, age in stale_build_locks().items():
            logger.warning("%s is %.0f min old: if no extension build is running, a killed build left it and "
                           "DeepSpeed's start will wait on it for good; remove it", lock, age / 60)
    mpi = launched_by_mpi()
    if mpi:
        drop_stale_rank_env()
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched and not mpi and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        raise RuntimeError(f"srun started {os.environ['SLURM_STEP_NUM_TASKS']} tasks, but neither torchrun's "
                           "variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) nor MPI's are set: each task "
                           "would train alone. Start them with srun --mpi=pmix (mpi4py finds the ranks) or run "
                           "torchrun in each task")
    if not launched and not mpi:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # the backend of DeepSpeed's accelerator (DS_ACCELERATOR=cpu on a GPU machine means gloo)
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    # under mpirun DeepSpeed sets MASTER_PORT from distributed_port: keep the one the user exported
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi, verbose=False,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    release_shm_buffers()
    return dist.get_world_size(), dist.get_rank()


def mark_every_rank(error: BaseException) -> None:
    """Tag an exception as raised on every rank alike (``abort_job_on_error`` lets it exit normally)."""
    try:
        error.on_every_rank = True
    except AttributeError:  # an exception type without a __dict__
        pass


@contextlib.contextmanager
def abort_job_on_error(unless: Tuple[type, ...] = ()):
    """Run an entry point so that, under ``mpirun``, an exception escaping on one rank aborts the
    whole job (``MPI_Abort``, after printing the traceback). Otherwise that rank blocks in
    ``MPI_Finalize`` at interpreter exit while the others wait in their next collective, forever.
    torchrun and the deepspeed launcher already stop every rank when one fails; errors raised on
    every rank alike (bad arguments, ``raise_if_any``; ``unless`` names more) exit normally."""
    try:
        yield
    except Exception as err:
        if isinstance(err, unless) or getattr(err, "on_every_rank", False):
            raise
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            mpi.COMM_WORLD.Abort(1)
        raise


def is_main_process() -> bool:
    """True on global rank 0: before torch.distributed starts, the rank its launcher set (a plain
    ``python`` is rank 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launch_rank() == 0


def log_main(msg: str, *args, level: int = logging.INFO, log: Optional[logging.Logger] = None) -> None:
    """Log on rank 0 only (to ``log``, the caller's module logger): the one door for rank-0-only
    side effects of the library."""
    if is_main_process():
        (log or logger).log(level, msg, *args)


@dataclass
class Communicator:
    """Collectives over one process group, on the device that its backend needs."""

    group: Optional[object] = None
    bytes_sent: int = 0  # bytes handed to collectives since creation

    @property
    def world_size(self) -> int:
        return world_size_and_rank(self.group)[0]

    @property
    def rank(self) -> int:
        return world_size_and_rank(self.group)[1]

    def _device(self) -> torch.device:
        if dist.is_initialized() and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _reduce(self, t: torch.Tensor, op, in_place: bool = False) -> torch.Tensor:
        """``t`` reduced over ranks: a new tensor, or with ``in_place`` ``t`` itself where it is
        contiguous and on the collective's device (no copy of a large matrix)."""
        out = t if in_place and t.is_contiguous() else t.detach().clone()
        if self.world_size == 1:
            return out
        self.bytes_sent += out.numel() * out.element_size()
        buf = out.to(self._device())
        dist.all_reduce(buf, op=op, group=self.group)
        return buf.to(t.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, returned as a new tensor.

        Collective: every rank must call this, in the same order.
        """
        return self._reduce(t, dist.ReduceOp.SUM)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``all_reduce_sum`` for a caller that gives ``t`` up: where ``t`` is already on the
        collective's device it is summed in place and returned (no copy of a large matrix, which
        would double the peak); elsewhere a new tensor, as ``all_reduce_sum``.

        Collective: every rank must call this, in the same order.
        """
        return self._reduce(t, dist.ReduceOp.SUM, in_place=True)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks, returned as a new tensor.

        Collective: every rank must call this, in the same order.
        """
        return self._reduce(t, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank.

        Collective: every rank must call this, in the same order.
        """
        return bool(self.all_reduce_max(torch.tensor([int(flag)], dtype=torch.int32)).item())

    def same(self, text: str) -> bool:
        """Whether every rank passed the same ``text`` (compared by a 62-bit hash of it).

        Collective: every rank must call this, in the same order.
        """
        value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2
        top = self.all_reduce_max(torch.tensor([value, -value], dtype=torch.int64))
        return int(top[0]) == value == -int(top[1])  # the largest and the smallest are this rank's

    def raise_if_any(self, error: Optional[BaseException], what: str, kind: type = RuntimeError) -> None:
        """Raise on every rank when ``error`` happened on any, so no rank waits forever (the
        others raise ``kind``).

        Collective: every rank must call this, in the same order.
        """
        if self.any(error is not None):
            if error is None:
                error = kind(f"{what} failed on another rank; see that rank's error")
                error.another_rank = True
            mark_every_rank(error)
            raise error

    def call(self, what: str, fn: Callable, *args, kind: type = RuntimeError):
        """``fn(*args)`` on this rank, its result; when it raises on any rank, every rank raises
        (``raise_if_any``: the others raise ``kind``). Collective: every rank must call this, in the
        same order."""
        error, out = None, None
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
        self.raise_if_any(error, what, kind)
        return out


SHARED_WAIT_ENV = "DS_BITTER7_SHARED_FS_WAIT"  # seconds a rank looks for rank 0's marker (``ranks_not_sharing``)
SHARED_WAIT_S = 65.0  # an NFS client may trust a cached "no such file" up to its acdirmax (60 s by default)


def ranks_not_sharing(folder: str, comm: Communicator) -> List[int]:
    """The ranks that do not see what rank 0 writes in ``folder`` (a folder local to each node,
    where a file system every node sees was meant; rank 0 makes it where missing). Rank 0 writes
    a marker named by a number it draws; every rank looks for it, a rank that misses it for up to
    ``$DS_BITTER7_SHARED_FS_WAIT`` seconds (default 65, for a network file system's cached
    lookups); rank 0 removes it.

    Collective: every rank must call this, in the same order.
    """
    if comm.world_size == 1:
        return []
    drawn = secrets.randbits(62) if comm.rank == 0 else 0
    token = int(comm.all_reduce_max(torch.tensor([drawn], dtype=torch.int64)).item())
    mark = os.path.join(folder, f".ds_bitter7_shared_{token:x}")

    def write_mark() -> None:
        os.makedirs(folder, exist_ok=True)
        with open(mark, "w", encoding="utf-8"):
            pass

    # also a barrier: the marker is there before any rank looks
    comm.call(f"writing in {folder!r}", write_mark if comm.rank == 0 else lambda: None)
    missing = torch.zeros(comm.world_size, dtype=torch.int32)
    missing[comm.rank] = int(not _appears(mark, _shared_wait_s()))
    missing = comm.all_reduce_sum(missing)  # every rank has looked
    if comm.rank == 0:
        with contextlib.suppress(OSError):  # a marker left behind is harmless; a rank failing alone is not
            os.remove(mark)
    return [r for r in range(comm.world_size) if missing[r]]


def rank_list(ranks: List[int], shown: int = 8) -> str:
    """``ranks`` for a message: the first ``shown``, then how many more."""
    more = len(ranks) - shown
    return ", ".join(map(str, ranks[:shown])) + (f" and {more} more" if more > 0 else "")


def _shared_wait_s() -> float:
    try:
        return max(0.0, float(os.environ.get(SHARED_WAIT_ENV, SHARED_WAIT_S)))
    except ValueError:
        logger.warning("%s=%r is no number of seconds: waiting %.0f s", SHARED_WAIT_ENV,
                       os.environ[SHARED_WAIT_ENV], SHARED_WAIT_S)
        return SHARED_WAIT_S


def _appears(path: str, wait_s: float) -> bool:
    """Whether the file ``path`` is there, or appears within ``wait_s`` seconds (polled each second,
    listing the folders above it, which makes a network file system's client look again)."""
    deadline = time.monotonic() + wait_s
    while not os.path.isfile(path):
        if time.monotonic() >= deadline:
            return False
        for folder in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            with contextlib.suppress(OSError):
                os.listdir(folder)
        time.sleep(1.0)  # polling a file system, not timing anything
    return True


class LocalComm(Communicator):
    """A communicator that reduces nothing: one process holds everything (stage 0, or no group)."""

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0


LOCAL = LocalComm()
