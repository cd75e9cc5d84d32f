# Shared defaults for the launch/*.sh scripts (sourced, not run).
# NPROC: ranks per node (default: number of GPUs, or 2 on CPU).  CONFIG: DeepSpeed JSON config.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$REPO/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    export PATH="$REPO/.venv/bin:$PATH"
fi
# MULTINODE=1 (set by a script before sourcing this): ranks on several nodes.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU=1
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # a shared node: only the GPUs this job may use
        NPROC="${NPROC:-$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)}"
    else  # one "GPU i:" line per GPU (MIG devices are listed, indented, under theirs)
        NPROC="${NPROC:-$(nvidia-smi -L | grep -c '^GPU ')}"
    fi
else
    GPU=0
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"   # no GPU: DeepSpeed's CPU accelerator + gloo
    if [ "${MULTINODE:-0}" = 0 ]; then  # loopback reaches this node only: several nodes need their interface
        export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
    fi
    NPROC="${NPROC:-2}"
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
CONFIG="${CONFIG:-$REPO/ds_configs/cpu_demo.json}"
export MASTER_PORT="${MASTER_PORT:-29517}"
TRAIN="$REPO/launch/train.py"
