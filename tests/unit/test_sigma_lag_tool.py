"""tools/sigma_lag.py on a hand-written log: the largest lag over layers per step, mean, max."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "sigma_lag.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("sigma_lag", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_from_a_hand_written_log(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "loss": 9.0},
        {"step": 10, "sigma_lag/layer_01/qkv": 0.20, "sigma_lag/layer_02/fc2": 0.05},
        {"step": 20, "sigma_lag/layer_01/qkv": 0.01, "sigma_lag/layer_02/fc2": 0.03},
        {"step": 20, "event": "warning"},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tool = load_tool()
    assert tool.main([str(run), "--steps", "10,20,30"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    # step 10: max 20%; step 20: max 3%; mean of the two maxima 11.5%; max 20%
    assert row == f"| {run} | 20.0% | 3.0% | - | 11.5% | 20.0% |"


def test_runs_without_the_metric_are_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert load_tool().main([str(run)]) == 2
    assert "no sigma_lag metrics" in capsys.readouterr().err
