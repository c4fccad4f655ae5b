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


def test_scale_table_is_gamma_over_the_exact_sigma(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    record = {"step": 50, "gamma/layer_01/qkv": 0.5, "sigma_exact/layer_01/qkv": 2.0,
              "gamma/layer_01/fc2": 0.3, "sigma_exact/layer_01/fc2": 0.5}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert load_tool().main([str(run), "--scale", "--steps", "50,60"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"| {run} | 0.250 to 0.600 | - |"


def test_metric_at_prints_values_at_steps_and_expands_patterns(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("metric_at", TOOL.parent / "metric_at.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 10, "tev/mean": 0.25, "attn_logit_max/layer_01": 178.123},
               {"step": 20, "attn_logit_max/layer_01": 1931.0, "attn_logit_max/layer_02": 5.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert tool.main([str(run), "--keys", "tev/mean,attn_logit_max/*", "--steps", "10,20"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        f"| {run} | tev/mean | 0.25 | - |",
        f"| {run} | attn_logit_max/layer_01 | 178.1 | 1931 |",
        f"| {run} | attn_logit_max/layer_02 | - | 5 |",
    ]
