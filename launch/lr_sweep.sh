#!/usr/bin/env bash
# The learning-rate sweep of Rybakov et al. on the 830M model: every method x every LR of the
# paper's grid, one SLURM job each (see recipes/rybakov_830m/base.yaml).
#   NODES=4 STEPS=10000 bash launch/lr_sweep.sh [key=value ...]
# STEPS (default 10000, 21B tokens, our choice) shortens the runs: divergence shows early.
# DRY_RUN=1 prints the sbatch commands instead of submitting them.
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-"baseline qk_norm qk_fc_norm qkv_norm soft_cap qk_norm_cap"}
LRS=${LRS:-"6.0e-3 8.0e-3 2.0e-2 4.0e-2 6.0e-2 8.0e-2"}
NODES=${NODES:-4}
STEPS=${STEPS:-10000}
for method in ${METHODS}; do
  for lr in ${LRS}; do
    min_lr=$(python -c "print(f'{${lr} / 10:.1e}')")
    run_dir="runs/rybakov_830m/sweep/${method}_lr${lr}"
    cmd=(sbatch --nodes "${NODES}" --job-name "sweep_${method}_${lr}"
         --export "ALL,RECIPE=recipes/rybakov_830m/${method}.yaml,RUN_DIR=${run_dir}"
         launch/slurm.sbatch "train.lr=${lr}" "train.min_lr=${min_lr}" "train.steps=${STEPS}"
         "$@")
    if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
  done
done
