#!/usr/bin/env bash
# One node's share of a multi-node run, without ssh: run it once on every node (SLURM's srun
# does, see slurm.sbatch) with the same HOSTFILE and MASTER_ADDR and this node's NODE_RANK
# (default: SLURM_NODEID). DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/cluster.env
source launch/common.sh
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
: "${MASTER_ADDR:?set MASTER_ADDR to the first node (rank 0) address}"
[[ -f "${HOSTFILE}" ]] || { echo "error: HOSTFILE=${HOSTFILE}: no such file" >&2; exit 2; }
train_overrides "$@"
cmd=(deepspeed --hostfile "${HOSTFILE}" --no_ssh --node_rank "${NODE_RANK}"
     --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" "${TRAIN_ARGS[@]}")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $/\n/'
  exit 0
fi
mkdir -p "${RUN_DIR}"
exec "${cmd[@]}"
