"""Run one of the repository's Python scripts (tools/*.py) in the test process."""

from __future__ import annotations

import contextlib
import io
import runpy
import subprocess
import sys
from pathlib import Path


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    """`script args` run as `__main__` in this process, with its own argv: its exit code and
    output as `subprocess.run(..., capture_output=True, text=True)` would return them, without
    a second import of torch, DeepSpeed and megatron-core (~5 s on a 2-core machine) per
    call. For scripts that leave no process-wide state behind (the tools' commands)."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    code = 0
    sys.argv = [str(script), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:  # sys.exit("message"): printed to stderr, status 1
            code = 1
            err.write(f"{exit_.code}\n")
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([str(script), *args], code, out.getvalue(),
                                       err.getvalue())
