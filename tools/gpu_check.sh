#!/usr/bin/env bash
# The GPU check: one command, at most ~8 minutes, for a machine with one (or two) NVIDIA GPUs.
# Every result and log goes into one folder (--out DIR, else $OUT, else runs/gpu_check/<time>),
# seven files at most; summary.md, printed last, is the table docs/gpu.md records.
#
#   bash tools/gpu_check.sh                 # on the GPU machine
#   bash tools/gpu_check.sh --rehearse      # the same steps on CPU at tiny shapes (~5-10 min)
#
# Where the project is not installed (a CUDA image without a package registry), run
# `bash tools/gpu_bundle.sh` first on a machine that reaches PyPI and bring .gpu/wheels along:
# the wheels are installed into .gpu/site with `pip install --no-index --no-deps --target`, and
# the project runs from the checkout through PYTHONPATH, on the machine's own torch (>= 2.11).
#
# Steps (each with its own time limit inside --budget, default 450 s; a failed step is recorded
# and the next one still runs; the exit status is non-zero if any step failed):
#   env      Python, torch, CUDA, the GPU, DeepSpeed and megatron-core versions  -> env.json
#   tests    the tests marked gpu (tests/gpu): SDPA, FlexAttention with the cap and the causal
#            block mask and the math kernel against the exact path in fp32 and bf16, forward
#            and backward; a bf16 run of every method recipe; TP2 over NCCL with 2 GPUs
#            -> tests.xml
#   830m     the 830M recipe (recipes/rybakov_830m/baseline.yaml) at TP1, bf16, micro-batch 2:
#            our training step against megatron-core's GPTModel of the same shape
#            (tools/benchmark.py --vs mcore): tokens/s, TFLOP/s, MFU, peak memory; recompute
#            none, and selective if that runs out of memory  -> bench_830m.json
#   methods  the step-time cost of QK-norm + cap (FlexAttention) and of sigma-reparam against
#            the baseline at the 830M shape, bf16 (tools/bench_methods.py)  -> methods_830m.json
#   metrics  the stability metrics' overhead at the 830M recipe (tools/bench_metrics.py)
#            -> metrics_830m.json
# PYTHON=... picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
start=$SECONDS

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "gpu_check: error: $*" >&2; exit 1; }

rehearse=0
budget=450
out=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) rehearse=1 ;;
    --out) [ $# -ge 2 ] || fail "--out needs a folder"; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    --budget) [ $# -ge 2 ] || fail "--budget needs seconds"; budget=$2; shift ;;
    --budget=*) budget=${1#--budget=} ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown argument $1 (valid: --rehearse, --out DIR, --budget SECONDS)" ;;
  esac
  shift
done
[[ "$budget" =~ ^[0-9]+$ ]] || fail "--budget must be a whole number of seconds, not $budget"
out=${out:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out" || fail "cannot create the output folder $out"
out=$(cd "$out" && pwd)
LOG=$out/check.log
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

if [ "$rehearse" = 1 ]; then
  export DS_ACCELERATOR=cpu
  say "REHEARSAL on CPU at tiny shapes: checks that every step runs to its end, measures nothing"
else
  command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: no NVIDIA driver on this machine"
  nvidia-smi -L 2>/dev/null | grep -q "^GPU " || fail "nvidia-smi lists no GPU"
  unset DS_ACCELERATOR  # a CPU run's setting must not leak in
fi

# The project from the checkout; DeepSpeed and megatron-core from .gpu/wheels where missing.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import deepspeed, megatron.core" >/dev/null 2>&1; then
  compgen -G ".gpu/wheels/*.whl" >/dev/null \
    || fail "DeepSpeed or megatron-core is missing and there is no .gpu/wheels (run tools/gpu_bundle.sh where PyPI is reachable)"
  wheels=(.gpu/wheels/*.whl)
  say "installing ${#wheels[@]} wheels from .gpu/wheels into .gpu/site"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target .gpu/site .gpu/wheels/*.whl >>"$LOG" 2>&1 \
    || fail "installing .gpu/wheels failed (see $LOG)"
  export PYTHONPATH="$ROOT/.gpu/site:$PYTHONPATH" PATH="$ROOT/.gpu/site/bin:$PATH"  # its deepspeed
fi
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

env_line=$("$PY" - "$out/env.json" "$rehearse" 2>>"$LOG" <<'EOF'

import json
import platform
import sys

import torch

info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
if sys.argv[2] == "0" and not info["cuda_available"]:
    print(f"torch {torch.__version__}: CUDA build {torch.version.cuda}, cuda.is_available() False",
          file=sys.stderr)
    sys.exit(3)
import stable_megatron  # noqa: E402  (refuses a torch that is too old, in one line)
import deepspeed  # noqa: E402
import megatron.core  # noqa: E402

info.update(deepspeed=deepspeed.__version__, megatron_core=megatron.core.__version__,
            stable_megatron=stable_megatron.__file__, deepspeed_path=deepspeed.__file__)
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu_memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in info.items() if not k.endswith("path")))
EOF
)
rc=$?
[ "$rc" -eq 3 ] && fail "torch sees no CUDA device (a CPU build of torch? see the README's install)"
[ "$rc" -eq 0 ] || { tail -n 5 "$LOG" >&2; fail "the environment check failed (see $LOG)"; }
echo "$env_line" | tee -a "$LOG"

# --- the steps ------------------------------------------------------------------------------
STATUS=$out/.steps  # "name status seconds" lines, read by the summary (and removed)
: >"$STATUS"
failed=0
# step NAME CAP_SECONDS COMMAND...: run with the smaller of CAP and what is left of the budget
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    say "[$name] skipped: ${left}s of the ${budget}s budget left"
    echo "$name skipped 0" >>"$STATUS"
    failed=1
    return 1
  fi
  say "[$name] $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    say "[$name] passed in ${took}s"
    echo "$name passed $took" >>"$STATUS"
  else
    if [ "$rc" -eq 124 ]; then
      say "[$name] TIMED OUT after ${took}s"
    else
      say "[$name] FAILED (exit $rc) after ${took}s"
    fi
    echo "$name failed $took" >>"$STATUS"
    tail -n 25 "$LOG" | sed 's/^/    /'
    failed=1
  fi
  return "$rc"
}

if [ "$rehearse" = 1 ]; then
  # the 830M recipe's settings (bf16, RoPE, untied embeddings) at a CPU-sized shape
  SHAPE=(model.num_layers=2 model.hidden_size=128 model.num_attention_heads=2
         model.ffn_hidden_size=512 model.seq_length=128 model.vocab_size=8192)
  METHOD_SHAPE=(--hidden 128 --layers 2 --heads 2 --seq 128 --batch 2 --vocab 1024)
  STEPS=(--steps 2 --warmup 1); ROUNDS=(--rounds 1 --warmup 0); DEVICE=cpu
  TEST_ENV=(env -u STABLE_MEGATRON_REQUIRE_GPU)
else
  SHAPE=()
  METHOD_SHAPE=(--hidden 1024 --layers 24 --heads 16 --seq 4096 --batch 2 --vocab 256000)
  STEPS=(--steps 8 --warmup 3); ROUNDS=(--rounds 3 --warmup 1); DEVICE=cuda
  TEST_ENV=(env STABLE_MEGATRON_REQUIRE_GPU=1)  # a missing GPU is an error, not a skip
fi
RECIPE=recipes/rybakov_830m/baseline.yaml
ONE_STEP=(train.global_batch_size=2 train.micro_batch_size=2 "parallel.device=$DEVICE")

step tests 200 "${TEST_ENV[@]}" "$PY" -m pytest tests/gpu -m gpu -v -rs -p no:cacheprovider \
  --timeout=180 "--junitxml=$out/tests.xml"

if ! step 830m 150 "$PY" tools/benchmark.py --recipe "$RECIPE" --shape recipe --vs mcore \
    "${STEPS[@]}" --save "$out/bench_830m.json" "${SHAPE[@]}" "${ONE_STEP[@]}" \
    train.recompute=none; then
  if grep -qi "out of memory" "$LOG"; then
    step 830m_selective 120 "$PY" tools/benchmark.py --recipe "$RECIPE" --shape recipe \
      --vs mcore "${STEPS[@]}" --save "$out/bench_830m.json" "${SHAPE[@]}" "${ONE_STEP[@]}" \
      train.recompute=selective
  fi
fi

step methods 120 "$PY" tools/bench_methods.py "${METHOD_SHAPE[@]}" --precision bf16 \
  --methods qk_norm_cap,sigma_reparam "${STEPS[@]}" --no-memory --device "$DEVICE" \
  --save "$out/methods_830m.json"

step metrics 100 "$PY" tools/bench_metrics.py --recipe "$RECIPE" --shapes recipe \
  "${ROUNDS[@]}" --device "$DEVICE" --save "$out/metrics_830m.json" "${SHAPE[@]}" \
  "${ONE_STEP[@]}"

# --- the summary ----------------------------------------------------------------------------
"$PY" - "$out" "$rehearse" <<'EOF' | tee -a "$LOG"
import json
import sys
from pathlib import Path

out, rehearse = Path(sys.argv[1]), sys.argv[2] == "1"


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


env = load("env.json") or {}
steps = [line.split() for line in (out / ".steps").read_text().splitlines()]
(out / ".steps").unlink()
lines = ["# GPU check" + (" (REHEARSAL on CPU: tiny shapes, the numbers mean nothing)"
                          if rehearse else ""), "",
         f"- machine: {', '.join(env.get('gpus') or ['no GPU'])}; Python {env.get('python')}, "
         f"torch {env.get('torch')} (CUDA {env.get('cuda')}), DeepSpeed {env.get('deepspeed')}, "
         f"megatron-core {env.get('megatron_core')}",
         "- steps: " + ", ".join(f"{n} {s} ({t} s)" for n, s, t in steps), "",
         "| measure | value | target |", "|---|---|---|"]


def row(name, value, target=""):
    lines.append(f"| {name} | {value} | {target} |")


bench = load("bench_830m.json")
if bench:
    ours, ref = bench["arms"]["ours"], bench["arms"].get("mcore")
    s = bench["shape"]
    row("830M shape", f"{s['layers']} x {s['hidden']}, seq {s['seq']}, micro-batch "
        f"{s['micro_batch']}, {s['precision']}, vocab {s['vocab']}")
    row("ours: step", f"{ours['time_s'] * 1e3:.1f} ms")
    row("ours: tokens/s", f"{ours['tokens_per_s']:,.0f}")
    row("ours: model TFLOP/s", f"{ours['tflops']:.1f}")
    row("ours: MFU", f"{ours['mfu']:.1%} of {bench['peak']['tflops']:.0f} TFLOP/s "
        f"({bench['peak']['kind']})", ">= 45%")
    row("ours: peak memory", f"{ours['peak_bytes'] / 2**30:.1f} GiB")
    if ref:
        row("megatron-core: step", f"{ref['time_s'] * 1e3:.1f} ms, peak "
            f"{ref['peak_bytes'] / 2**30:.1f} GiB")
        row("ours / megatron-core step time", f"{ref['ours_over']:.3f}x (paired)", "<= 1.05x")
methods = load("methods_830m.json")
if methods:
    for name, label in (("qk_norm_cap", "QK-norm + cap"), ("sigma_reparam", "sigma-reparam")):
        m = methods["methods"].get(name)
        if m:
            path = methods.get("attention_paths", {}).get(name, "?")
            row(f"{label} / baseline step time", f"{m['time_ratio']:.3f}x ({path})",
                "<= 1.15x" if name == "qk_norm_cap" else "")
metrics = load("metrics_830m.json")
if metrics:
    for shape in metrics["shapes"].values():
        row("stability metrics overhead", f"{shape['overhead']:+.1%} at metrics.interval "
            f"{shape['interval']} (a metric step {shape['metric_step_ratio']:.2f}x a plain one)")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

if [ "$failed" = 0 ]; then
  say "passed in $((SECONDS - start)) s; results in $out"
else
  say "FAILED (see the steps above and $LOG); results in $out"
  exit 1
fi
