#!/usr/bin/env bash
# Several nodes with DeepSpeed's launcher and a hostfile (see launch/hostfile.example).
# Run on the first node of the hostfile; it ssh-es into the others (pdsh when installed).
#   HOSTFILE=launch/hostfile MASTER_ADDR=node-0 NCCL_SOCKET_IFNAME=eth0 \
#       CONFIG=ds_configs/zero2_bf16_bitter7.json launch/run_multinode.sh --model gpt2 --steps 10000
#   MASTER_ADDR        address of the first node, reachable from all nodes (passed as --master_addr)
# DeepSpeed's runner forwards to the other nodes only NCCL_*, PYTHON* and a few other variables;
# put any other in ~/.deepspeed_env on the first node (one VAR=value a line), for instance
#   GLOO_SOCKET_IFNAME=eth0   the interface gloo uses between nodes (CPU; never `lo` across nodes)
#   DS_ACCELERATOR=cpu        on CPU nodes
set -euo pipefail
MULTINODE=1
source "$(dirname "$0")/_common.sh"
HOSTFILE="${HOSTFILE:-$REPO/launch/hostfile}"
if [ ! -f "$HOSTFILE" ]; then  # DeepSpeed's runner would warn and train on this node alone
    echo "run_multinode.sh: hostfile $HOSTFILE not found: set HOSTFILE (see launch/hostfile.example);" \
         "for one node use launch/run_deepspeed.sh" >&2
    exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
# DS_LAUNCHER_ARGS: extra deepspeed-launcher flags, e.g. "--no_ssh --node_rank 1" to start each
# node yourself (no ssh; run the same command on every node with its own rank), "--no_ssh_check",
# "--launcher openmpi", "--include node-0:0,1@node-1:0,1".
# shellcheck disable=SC2086
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    ${DS_LAUNCHER_ARGS:-} "$TRAIN" --deepspeed_config "$CONFIG" "$@"
