#!/usr/bin/env bash
# One node, GPUS_PER_NODE GPUs:
#   RECIPE=recipes/gpt2_depth/l12_mlra.yaml RUN_DIR=/shared/runs/l12_mlra \
#     bash launch/single_node.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=1
source launch/cluster.env
source launch/common.sh
train_overrides "$@"
mkdir -p "${RUN_DIR}"
exec deepspeed --num_gpus "${GPUS_PER_NODE}" --master_port "${MASTER_PORT}" "${TRAIN_ARGS[@]}"
