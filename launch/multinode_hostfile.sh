#!/usr/bin/env bash
# Several nodes from one command, DeepSpeed reaching the others over passwordless ssh (pdsh).
# HOSTFILE lists one node per line, "<host> slots=<gpus>" (the first is the master); run this
# on that first node, from a checkout on a file system all nodes share:
#   HOSTFILE=/shared/hostfile NODES=4 RECIPE=recipes/rybakov_830m/qk_norm.yaml \
#     RUN_DIR=/shared/runs/qk_norm bash launch/multinode_hostfile.sh [--max-restarts N] \
#     [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/cluster.env
source launch/common.sh
[[ -f "${HOSTFILE}" ]] || { echo "error: HOSTFILE=${HOSTFILE}: no such file" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "${HOSTFILE}")}
restart_flags "$@"
train_overrides "${ARGS[@]}"
mkdir -p "${RUN_DIR}"
# Variables DeepSpeed forwards to the other nodes (it reads ./.deepspeed_env).
env | grep -E '^(NCCL_|TORCH_NCCL_|GLOO_|OMP_NUM_THREADS|PYTHONUNBUFFERED|CUDA_DEVICE_MAX)' \
  > .deepspeed_env || true
run_with_restarts deepspeed --hostfile "${HOSTFILE}" --num_nodes "${NODES}" \
  --num_gpus "${GPUS_PER_NODE}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
  "${TRAIN_ARGS[@]}"
