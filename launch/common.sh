# shellcheck shell=bash
# Shared by the launch/ scripts: the config overrides for this cluster size, validated first.
# Usage (after sourcing cluster.env): train_overrides "$@"   -> sets the array TRAIN_ARGS.
set -euo pipefail

train_overrides() {
  local data=()
  if [[ -n "${DATA_PREFIX}" ]]; then
    data=(data.source=indexed "data.train_prefix=${DATA_PREFIX}_train"
          "data.val_prefix=${DATA_PREFIX}_val" "data.tokenizer_model=${DATA_PREFIX}.model")
  fi
  local user=("train.run_dir=${RUN_DIR}" "${data[@]}" "$@")
  # The recipe's layout for NODES x GPUS_PER_NODE (its `layouts:`), after checking the whole
  # config at that world size: a bad recipe or override stops here, before any GPU is used.
  local layout
  layout=$(python -m stable_megatron.plan "${RECIPE}" "${user[@]}" --nodes "${NODES}" \
    --gpus-per-node "${GPUS_PER_NODE}" --print-overrides)
  # shellcheck disable=SC2034,SC2206  # read by the sourcing script; plain key=value words
  TRAIN_ARGS=(--module stable_megatron.train "${RECIPE}" ${layout} "${user[@]}")
}
