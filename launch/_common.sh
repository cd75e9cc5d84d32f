# Shared defaults for the launch/*.sh scripts (sourced, not run).
# NPROC: ranks per node (default: number of GPUs, or 2 on CPU).  CONFIG: DeepSpeed JSON config.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$REPO/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    export PATH="$REPO/.venv/bin:$PATH"
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
else
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"   # no GPU: DeepSpeed's CPU accelerator + gloo
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
    NPROC="${NPROC:-2}"
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
CONFIG="${CONFIG:-$REPO/ds_configs/cpu_demo.json}"
export MASTER_PORT="${MASTER_PORT:-29517}"
TRAIN="$REPO/launch/train.py"
