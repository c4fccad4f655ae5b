#!/usr/bin/env bash
# Install what the tests need, then run the default test suite (everything but `slow`).
#   bash tools/test.sh            # default suite (CI)
#   bash tools/test.sh -m slow    # the slow target
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash tools/install.sh test || exit 1
export DS_ACCELERATOR=cpu PYTHONWARNINGS=ignore
unset CUDA_VISIBLE_DEVICES
# --durations: the slowest tests at the end of the log, to keep the default target short
${PYTHON:-python3} -m pytest --durations=25 "$@"
status=$?
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
if [ "$status" -eq 5 ]; then
  echo "error: no tests were collected" >&2
  exit 1
fi
exit "$status"
