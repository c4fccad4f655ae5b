#!/usr/bin/env bash
# One node, GPUS_PER_NODE GPUs; --max-restarts N relaunches after a failure (common.sh):
#   RECIPE=recipes/gpt2_depth/l12_mlra.yaml RUN_DIR=/shared/runs/l12_mlra \
#     bash launch/single_node.sh [--max-restarts N] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=1
source launch/cluster.env
source launch/common.sh
restart_flags "$@"
train_overrides "${ARGS[@]}"
mkdir -p "${RUN_DIR}"
run_with_restarts deepspeed --num_gpus "${GPUS_PER_NODE}" --master_port "${MASTER_PORT}" \
  "${TRAIN_ARGS[@]}"
