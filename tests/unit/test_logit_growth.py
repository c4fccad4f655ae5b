"""The largest attention logit at matched loss (analysis/logit_growth.py) on hand-made sweeps:
the matched loss, the logit read there, diverged runs apart, and the report command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stable_megatron.analysis import logit_growth
from stable_megatron.report import main as report_main


def write_run(root: Path, method: str, lr: float, seed: int, losses: list[float],
              logits: dict[int, float], status: str = "done") -> None:
    """A run with a loss every step and `attn_logit_max/layer_01`/`_02` at the given steps
    (layer 2 holds the larger value)."""
    run = root / method / f"seed_{seed}" / f"lr_{lr:g}"
    run.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        record = {"step": step, "loss": loss}
        if step in logits:
            record["attn_logit_max/layer_01"] = logits[step] / 2
            record["attn_logit_max/layer_02"] = logits[step]
        lines.append(json.dumps(record))
    if status == "diverged":
        lines.append(json.dumps({"step": len(losses), "event": "diverged"}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "sweep_run.json").write_text(json.dumps({"status": status}))


def falling(start: float, end: float, steps: int) -> list[float]:
    return [start + (end - start) * i / (steps - 1) for i in range(steps)]


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    # at lr 0.01: "fast" reaches 4.0, "slow" only 5.0 -> the matched loss is slow's
    write_run(root, "fast", 0.01, 1, falling(8.0, 4.0, 41), {10: 2.0, 20: 8.0, 30: 30.0,
                                                              40: 90.0})
    write_run(root, "fast", 0.01, 2, falling(8.0, 4.0, 41), {10: 1.0, 20: 4.0, 30: 10.0,
                                                              40: 50.0})
    write_run(root, "slow", 0.01, 1, falling(8.0, 5.0, 41), {10: 1.0, 20: 1.5, 30: 2.0,
                                                              40: 3.0})
    write_run(root, "slow", 0.01, 2, falling(8.0, 6.0, 20) + [float("nan")],
              {10: 1e4}, status="diverged")
    return root


def test_the_matched_loss_is_the_lowest_every_stable_run_reaches(sweep):
    curves = logit_growth.curves(sweep)
    assert len(curves) == 4
    (level,) = logit_growth.matched_levels(curves).values()
    # slow seed 1's lowest trailing mean at a metric step: at step 40, over steps 31-40
    assert level == pytest.approx(sum(falling(8.0, 5.0, 41)[30:40]) / 10)  # 5.4125
    fast = next(c for c in curves if c.method == "fast" and c.seed == 1)
    # fast's trailing mean is 5.55 at step 30 and 4.55 at step 40
    assert fast.logit_at(level) == 90.0 and fast.logit_at(7.0) == 8.0
    assert fast.logit_at(3.0) is None


def test_the_table_counts_a_diverged_run_apart(sweep):
    lines = logit_growth.table(logit_growth.curves(sweep), ["slow", "fast"])
    assert lines[0].startswith("| method | lr 0.01 (loss 5.41)")
    assert lines[2] == "| slow | 3, 1 div |"
    assert lines[3] == "| fast | 70 (50-90) |"


def test_the_report_command_writes_the_page_and_figure(sweep, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert report_main(["--logit-growth", str(sweep), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "logit_growth.md").read_text()
    assert "| fast | 70 (50-90) |" in page and "logit_growth.png" in page
    assert (tmp_path / "out" / "logit_growth.png").read_bytes()[:4] == b"\x89PNG"
    assert report_main(["--logit-growth", str(tmp_path / "nothing")]) == 2
    assert "no such sweep directory" in capsys.readouterr().err
