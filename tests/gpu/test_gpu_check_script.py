"""Runs on CPU (not marked gpu): tools/gpu_check.sh fails loudly without a GPU, refuses bad
arguments in one line, and its CPU rehearsal (slow) runs every step to the end and writes the
summary; the gpu tests are collected by the default suite and skip with the reason "needs
CUDA"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _fake_nvidia_smi(tmp_path: Path, listing: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_gpu_check_fails_when_the_driver_lists_no_gpu(tmp_path):
    proc = _run(_fake_nvidia_smi(tmp_path, ""), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "gpu_check: error: nvidia-smi lists no GPU" in proc.stderr


def test_gpu_check_fails_when_torch_sees_no_cuda(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU from torch, on any machine
    proc = _run(_fake_nvidia_smi(tmp_path, "GPU 0: Fake (UUID: GPU-0)\\n"), "--out",
                str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "gpu_check: error: torch sees no CUDA device" in proc.stderr
    assert "pytest" not in proc.stdout  # stopped before the tests


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument --bogus (valid: --rehearse, --out DIR, --budget SECONDS)"),
    (["--budget", "ten"], "--budget must be a whole number of seconds, not ten"),
    (["--out"], "--out needs a folder"),
])
def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    proc = _run(dict(os.environ), *args)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"gpu_check: error: {message}"


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_step_and_writes_the_summary(tmp_path):
    """`--rehearse`: the GPU check's steps on CPU at tiny shapes, on this machine's torch."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = _run(env, "--rehearse", "--out", str(out), "--budget", "1500", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for step in ("tests", "830m", "methods", "metrics"):
        assert f"gpu_check: [{step}] passed" in proc.stdout, step
    files = {p.name for p in out.iterdir()}
    assert files == {"check.log", "env.json", "tests.xml", "bench_830m.json",
                     "methods_830m.json", "metrics_830m.json", "summary.md"}
    summary = (out / "summary.md").read_text()
    assert "REHEARSAL" in summary
    for row in ("ours / megatron-core step time", "QK-norm + cap / baseline step time",
                "sigma-reparam / baseline step time", "stability metrics overhead"):
        assert row in summary, row


def test_gpu_tests_are_collected_and_skip_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("STABLE_MEGATRON_REQUIRE_GPU", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-rs", "-q",
         "-p", "no:cacheprovider"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(line.endswith("needs CUDA") for line in skips), proc.stdout[-3000:]
    assert " passed" not in proc.stdout and "failed" not in proc.stdout
