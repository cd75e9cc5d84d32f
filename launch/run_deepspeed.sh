#!/usr/bin/env bash
# One node, DeepSpeed's own launcher.  Extra arguments go to launch/train.py.
#   NPROC=2 launch/run_deepspeed.sh --demo
#   NPROC=8 CONFIG=ds_configs/zero2_bf16_bitter7.json launch/run_deepspeed.sh --model gpt2 --steps 10000
set -euo pipefail
source "$(dirname "$0")/_common.sh"
# On CPU, --num_gpus is the number of ranks (the CPU accelerator accepts any count). With
# CUDA_VISIBLE_DEVICES, --include names those GPUs: --num_gpus would make DeepSpeed's runner drop
# the variable and use GPUs 0..NPROC-1.
DEVICES=(--num_gpus "$NPROC")
if [ "$GPU" = 1 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    DEVICES=(--include "localhost:$(cut -d, -f1-"$NPROC" <<<"$CUDA_VISIBLE_DEVICES")")
fi
exec deepspeed "${DEVICES[@]}" --master_port "$MASTER_PORT" \
    "$TRAIN" --deepspeed_config "$CONFIG" "$@"
