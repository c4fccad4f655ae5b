"""The torch floor: stable_megatron refuses an older torch at import, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import stable_megatron

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, parsed", [("2.13.0+cpu", (2, 13)), ("2.11.0+cu130", (2, 11)),
                                          ("2.9.1", (2, 9)), ("3.0.0a0+git1234", (3, 0))])
def test_version_parsing(text, parsed):
    assert stable_megatron._torch_version(text) == parsed


def test_an_older_torch_is_refused_in_one_line():
    code = ("import sys, importlib.metadata as m; m.version = lambda name: '2.10.1+cu128';"
            "import stable_megatron")  # python -c: the working directory comes first
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: stable_megatron needs torch >= 2.11; this Python has torch 2.10.1+cu128")


def test_importing_the_package_does_not_import_torch():
    code = "import sys, stable_megatron; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)
    assert proc.stdout.strip() == "False"
