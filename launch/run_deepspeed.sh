#!/usr/bin/env bash
# One node, DeepSpeed's own launcher.  Extra arguments go to launch/train.py.
#   NPROC=2 launch/run_deepspeed.sh --demo
#   NPROC=8 CONFIG=ds_configs/zero2_bf16_bitter7.json launch/run_deepspeed.sh --model gpt2 --steps 10000
set -euo pipefail
source "$(dirname "$0")/_common.sh"
# On CPU, --num_gpus is the number of ranks (the CPU accelerator accepts any count).
exec deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
    "$TRAIN" --deepspeed_config "$CONFIG" "$@"
