"""tools/plot_metrics.py: writes a PNG from synthetic metrics.jsonl files, with the early
warnings replayed from the records and the divergence step."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from stable_megatron.analysis.plotting import divergence_step

pytest.importorskip("matplotlib")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run_dir: Path, diverge: bool) -> None:
    """Loss every step, stability metrics every 2 steps; `diverge`: max logit and TEV grow and
    entropy collapses from step 40, the loss climbs from step 60 and is NaN at the end."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, 101):
        loss = 9.0 - 3.0 * min(step, 50) / 50
        if diverge and step >= 60:
            loss = 6.0 + 0.1 * (step - 60) if step < 100 else float("nan")
        record = {"step": step, "loss": loss, "grad_norm": 1.0 if not diverge else 1.0 + step}
        if step % 2 == 0:
            grow = 1.1 ** max(0, step - 40) if diverge else 1.0
            for layer in (1, 2):
                record[f"attn_logit_max/layer_{layer:02d}"] = 20.0 * grow
                record[f"attn_entropy_norm/layer_{layer:02d}/min"] = 0.5 / grow
            record["tev/mean"] = 0.02 * (1.0 + 0.05 * max(0, step - 40) if diverge else 1.0)
        lines.append(json.dumps(record))
        if diverge and step == 50:
            lines.append(json.dumps({"event": "warning", "step": 50, "message": "logged"}))
    lines.append('{"step": 101, "loss"')  # a torn last line of a live run
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_writes_a_png_with_warnings_and_divergence(tool, tmp_path, capsys):
    write_run(tmp_path / "healthy", diverge=False)
    write_run(tmp_path / "divergent", diverge=True)
    (tmp_path / "divergent" / "config.yaml").write_text(
        "stability:\n  warning:\n    logit_floor: 40.0\n    tev_growth: 2.0\n")
    out = tmp_path / "img" / "plot.png"
    assert tool.main([str(tmp_path / "healthy"), str(tmp_path / "divergent"), "--out",
                      str(out), "--labels", "healthy", "high LR", "--title", "demo"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "healthy: loss did not diverge" in text
    # the run's config.yaml lowers the floor to 40 (20 * 1.1^8 = 42.9 at step 48) and turns the
    # TEV rule on (off by default)
    assert "warning (logit_growth) step 48:" in text
    assert "warning (entropy_collapse)" in text and "warning (tev_growth)" in text
    assert "high LR: loss diverged at step 71" in text  # 7.1 > 6.0 + 1 from step 71 on


def test_divergence_step():
    def records(losses):
        return [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]

    assert divergence_step(records([9, 8, 7, 6] * 10)) is None
    # one spike that recovers at once is not a divergence; a non-finite loss is
    assert divergence_step(records([9, 7, 6, 12, 6, 6, 6])) is None
    assert divergence_step(records([9, 7, 6, math.inf, 6])) == 4
    assert divergence_step(records([9, 7, 6] + [7.5] * 9 + [5.0])) is None
    assert divergence_step(records([9, 7, 6] + [7.5] * 10), patience=10) == 4
    assert divergence_step(records([9, 7, 6] + [6.5] * 10), margin=0.4) == 4


def test_missing_run_is_one_line(tool, tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl: no such file"):
        tool.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
