"""Smoke test of tools/bench_metrics.py: the script itself, in a subprocess, on a tiny shape for a
few steps (metrics every 2 steps). Checks that the report and the saved JSON carry the numbers,
never their values."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_metrics.py"
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.seq_length=32", "data.vocab_size=256", "train.micro_batch_size=2",
        "train.global_batch_size=4", "metrics.interval=2"]
ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    saved = tmp_path_factory.mktemp("bench") / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore"}
    for name in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)  # a world of one with its own port
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--rounds", str(ROUNDS),
         "--warmup", "0", "--device", "cpu", "--save", str(saved), *TINY],
        capture_output=True, text=True, env=env, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(saved.read_text())


def table_row(report: str, header_start: str) -> str:
    """The first data row of the table whose header starts with `header_start`."""
    lines = report.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    return lines[index + 2]  # after the header and its rule


def test_report_has_the_numbers(run):
    report, _ = run
    number = r"-?\d+(\.\d+)?"
    row = table_row(report, "shape  interval")
    assert row.startswith("tiny")
    # interval, off and on ms/step and IQRs, on/off, paired, metric and plain step, ratio, implied
    assert len(re.findall(number, row)) == 11, row
    assert len(re.findall(rf"\s{number}x", row)) == 3 and re.search(r"[+-]\d+\.\d%$", row)
    extra = table_row(report, "shape  extra")
    assert extra.startswith("tiny") and len(re.findall(number, extra)) == 5, extra
    assert re.search(r"target: metrics on vs off <= \+3% .*: tiny [+-]\d+\.\d% (PASS|FAIL)",
                     report)
    assert "world 1" in report and "model.seq_length=32" in report


def test_saved_result(run):
    _, result = run
    r = result["shapes"]["tiny"]
    assert r["interval"] == 2 and r["rounds"] == ROUNDS
    assert r["shape"]["layers"] == 2 and r["shape"]["accumulation"] == 2
    assert len(r["blocks"]["on"]) == len(r["blocks"]["off"]) == ROUNDS
    assert len(r["metric_steps"]) == ROUNDS  # one metric step per "on" block
    assert len(r["plain_steps"]) == ROUNDS * (2 * r["interval"] - 1)
    for key in ("on_s", "off_s", "metric_step_s", "plain_step_s", "ratio", "paired_ratio",
                "metric_step_ratio"):
        assert r[key] > 0 and math.isfinite(r[key]), key
    assert set(r["phases_s"]) == {"before_step", "before_update", "after_step"}
    assert all(v > 0 for v in r["phases_s"].values())  # every phase of the metric step ran
    assert isinstance(r["pass"], bool)


def test_cli_errors():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "huge"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and "unknown shape huge" in proc.stderr
