"""Set-up shared by every test module."""

from __future__ import annotations

import glob
import os
import sys
import time


def pytest_sessionstart(session):
    """DeepSpeed JIT-builds its CPU communication op on every start, under a file lock in the torch
    extensions folder. Each virtual environment gets its own folder (inherited by every rank and
    launcher the tests start), so two checkouts' environments never rebuild over each other. A
    lock that a process killed while holding it left behind (an aborted earlier run) would make
    every start wait forever: locks older than 10 minutes are removed, as no build or load holds
    one that long."""
    root = os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        if time.time() - os.path.getmtime(lock) > 600:
            os.remove(lock)
