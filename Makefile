# One set-up for every target: a virtual environment in .venv with the CPU build of torch
# (when no torch is importable) and the package with its test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Elsewhere, point this at a CPU wheel index (e.g. PyTorch's /whl/cpu) to avoid the CUDA build.
TORCH_INDEX ?=
export DS_ACCELERATOR ?= cpu
export GLOO_SOCKET_IFNAME ?= lo
export TOKENIZERS_PARALLELISM ?= false
# The venv's tools first, for every process the tests start: DeepSpeed JIT-builds its CPU
# communication op with the first `ninja` on PATH, and the launcher tests put the venv's first;
# two ninja versions on one build folder rebuild the op (a minute) each time they alternate.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# DeepSpeed JIT-builds that op (about two minutes on 2 cores) on its first start, under a file lock.
# Each venv builds into its own folder, and the tests' target builds it once before the suite:
# built inside a test, a time limit could kill the build and leave the lock behind, and every
# later DeepSpeed start would wait on it for good.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install ds_ops test lint demo bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without a GPU, a bare torch requirement would pull a multi-GB CUDA build: install the CPU one first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Removes the locks a killed build left (those init_distributed warns about), then calls exactly what
# DeepSpeed's torch backend calls at its start (2 s once built, so it runs every time: a deleted
# build folder is rebuilt here too).
ds_ops: install
	$(PY) -c "import os; from ds_bitter7.comm import stale_build_locks; [os.remove(p) for p in stale_build_locks()]; \
	from deepspeed.comm.torch import build_shm_op; build_shm_op()"

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: lint ds_ops
	$(PY) -m pytest -q tests

demo: ds_ops
	$(VENV)/bin/torchrun --nproc_per_node 2 --master_port 29517 launch/train.py --config ds_configs/cpu_demo.json --demo

bench: ds_ops
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs
