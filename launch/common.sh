# shellcheck shell=bash
# Shared by the launch/ scripts: the config overrides for this cluster size, validated first,
# and the relaunch loop. Usage (after sourcing cluster.env):
#   restart_flags "$@"               -> MAX_RESTARTS, RESTART_BACKOFF; the rest in ARGS
#   train_overrides "${ARGS[@]}"     -> sets the array TRAIN_ARGS
#   run_with_restarts CMD...         -> runs CMD, relaunching it after a failure
set -euo pipefail

: "${MAX_RESTARTS:=0}"      # relaunches after a failure (--max-restarts N)
: "${RESTART_BACKOFF:=10}"  # seconds before the first relaunch, doubled each time up to 300

restart_flags() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
      --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
      --restart-backoff) RESTART_BACKOFF=$2; shift 2 ;;
      --restart-backoff=*) RESTART_BACKOFF=${1#*=}; shift ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  [[ "${MAX_RESTARTS}" =~ ^[0-9]+$ && "${RESTART_BACKOFF}" =~ ^[0-9]+$ ]] || {
    echo "error: --max-restarts and --restart-backoff take whole numbers" >&2; exit 2; }
}

# What an exit code of the training command means (stable_megatron.train, the launchers).
describe_exit() {
  case "$1" in
    1) echo "a process failed" ;;
    2) echo "a config, data or checkpoint error" ;;
    3) echo "training aborted: the rollback limit" ;;
    4) echo "the step watchdog found a stalled step" ;;
    137 | 247) echo "a process was killed" ;;
    *) echo "a process failed" ;;
  esac
}

# Run "$@"; after a failure relaunch the same command (it resumes from the newest complete
# checkpoint) up to MAX_RESTARTS times, waiting RESTART_BACKOFF seconds (doubling, at most
# 300). Exit codes 0 (finished), 2 and 3 end the loop at once: a relaunch cannot change them.
run_with_restarts() {
  local attempt=0 rc backoff=${RESTART_BACKOFF}
  while true; do
    set +e
    "$@"
    rc=$?
    set -e
    case "${rc}" in
      0) return 0 ;;
      2 | 3)
        echo "stable_megatron: exit code ${rc} ($(describe_exit "${rc}")): a relaunch cannot" \
          "fix it; not relaunching" >&2
        return "${rc}" ;;
    esac
    if ((attempt >= MAX_RESTARTS)); then
      echo "stable_megatron: exit code ${rc} ($(describe_exit "${rc}")); ${attempt} of" \
        "--max-restarts ${MAX_RESTARTS} relaunches used: giving up" >&2
      return "${rc}"
    fi
    attempt=$((attempt + 1))
    echo "stable_megatron: exit code ${rc} ($(describe_exit "${rc}")); relaunch ${attempt} of" \
      "${MAX_RESTARTS} in ${backoff} s, resuming from the newest complete checkpoint" >&2
    sleep "${backoff}"
    backoff=$((backoff * 2 > 300 ? 300 : backoff * 2))
  done
}

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
