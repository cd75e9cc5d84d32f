#!/usr/bin/env bash
# One node with torchrun.  Extra arguments go to launch/train.py.
#   NPROC=2 launch/run_torchrun.sh --demo
# Multi-node: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node-0 address> launch/run_torchrun.sh ...
set -euo pipefail
if [ "${NNODES:-1}" != 1 ]; then
    MULTINODE=1
    if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
        echo "run_torchrun.sh: NNODES=$NNODES needs NODE_RANK (this node's rank, 0..$((NNODES - 1))) and" \
             "MASTER_ADDR (node 0's address, reachable from every node)" >&2
        exit 2
    fi
    if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
        echo "run_torchrun.sh: NODE_RANK=$NODE_RANK is not a node rank of NNODES=$NNODES (0..$((NNODES - 1)))" >&2
        exit 2
    fi
    case "$MASTER_ADDR" in
        127.* | localhost | ::1) echo "run_torchrun.sh: MASTER_ADDR=$MASTER_ADDR reaches this node only;" \
                                      "give node 0's address on the network" >&2; exit 2 ;;
    esac
fi
source "$(dirname "$0")/_common.sh"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" \
    "$TRAIN" --config "$CONFIG" "$@"
