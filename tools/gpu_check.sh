#!/usr/bin/env bash
# The GPU check: one command for a machine with one or two NVIDIA GPUs, after the README's
# install (`bash tools/install.sh test`, with a CUDA build of torch 2.13). About 5-10 minutes.
#   bash tools/gpu_check.sh
# 1. the tests marked `gpu` (tests/gpu/): SDPA, FlexAttention (cap + causal block mask) and the
#    math kernel against the exact path in fp32 and bf16, forward and backward; a bf16 training
#    run of the tiny recipe with every method of recipes/methods/; with two GPUs, TP=2 over
#    NCCL against one GPU;
# 2. a short benchmark of the tiny recipe in bf16: tokens/s and MFU.
# Exits non-zero if no GPU is found or any step fails. PYTHON=... picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
start=$SECONDS

fail() { echo "gpu_check: error: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi -L 2>/dev/null | grep -q "^GPU " || fail "nvidia-smi lists no GPU"
"$PY" - <<'EOF' || fail "torch sees no CUDA device (a CPU build of torch? see the README's install)"
import sys
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__}: CUDA build {torch.version.cuda}, cuda.is_available() False",
          file=sys.stderr)
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    print(f"gpu_check: cuda:{i} {torch.cuda.get_device_name(i)}")
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())") || fail "cannot count GPUs"

# A CPU run's settings must not leak in; a missing GPU is an error in the tests, not a skip.
unset DS_ACCELERATOR
export PYTHONWARNINGS=ignore STABLE_MEGATRON_REQUIRE_GPU=1

echo "gpu_check: [1/2] tests marked gpu on $gpus GPU(s)"
[ "$gpus" -ge 2 ] || echo "gpu_check: one GPU: the TP=2 over NCCL test is skipped (needs 2)"
"$PY" -m pytest tests/gpu -m gpu -v -rs -p no:cacheprovider --timeout=900
status=$?
[ "$status" -eq 0 ] || fail "gpu tests failed (pytest exit $status)"

echo "gpu_check: [2/2] benchmark: tiny recipe, bf16, one GPU"
if [ -f tools/benchmark.py ]; then
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout 600 \
    "$PY" tools/benchmark.py --shape tiny train.precision=bf16 \
    || fail "tools/benchmark.py failed"
else
  run_dir=$(mktemp -d)
  trap 'rm -rf "$run_dir"' EXIT
  log="$run_dir/train.log"
  timeout 600 "$PY" -m stable_megatron.train recipes/tiny.yaml train.precision=bf16 \
    train.steps=20 train.log_interval=5 train.eval_interval=0 checkpoint.interval=0 \
    logging.tensorboard=false logging.progress=false "train.run_dir=$run_dir/run" \
    >"$log" 2>&1 || { tail -n 40 "$log" >&2; fail "the benchmark run failed"; }
  grep -E "tok/s" "$log" | tail -n 2
  grep -q "MFU" "$log" || echo "gpu_check: no MFU in the log (GPU peak unknown to model/size.py)"
fi

echo "gpu_check: passed in $((SECONDS - start)) s"
