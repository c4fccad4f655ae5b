#!/usr/bin/env bash
# Quickstart: install, then train recipes/tiny.yaml on the built-in corpus with 2 CPU processes
# at tensor-parallel size 2, through the deepspeed launcher, and continue a prompt with the
# trained model. Extra arguments are config overrides, e.g.  bash launch/quickstart.sh
# train.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
unset CUDA_VISIBLE_DEVICES
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
run_dir=runs/tiny
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" \
  --module stable_megatron.train recipes/tiny.yaml parallel.tp=2 train.run_dir="$run_dir" "$@"
echo "sample from the trained model (stable-megatron generate $run_dir --prompt ...):"
"${PYTHON:-python3}" -m stable_megatron generate "$run_dir" --prompt "The state of the Union is" \
  --max-new-tokens 40
echo "logs: $run_dir/metrics.jsonl, $run_dir/config.yaml, checkpoints in $run_dir/checkpoints"
echo "view: tensorboard --logdir $run_dir"
