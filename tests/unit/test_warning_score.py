"""Scoring the early warning (stable_megatron/analysis/warning_score.py) on hand-made runs whose
labels, onsets and warnings are known, so that every number of the score table is known."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from stable_megatron.analysis import warning_score as ws
from stable_megatron.analysis.series import write_series
from stable_megatron.config import WarningConfig


def run(method="m", lr=1e-2, seed=1, status="done", final=5.0, losses=None, label=None,
        onset=None, records=None) -> ws.ScoredRun:
    return ws.ScoredRun(method=method, lr=lr, seed=seed, status=status,
                        final_loss=final if status == "done" else None,
                        losses=losses or {}, records=records or [], label=label, onset=onset)


def test_known_precision_recall_false_alarms_and_lead():
    runs = [
        run(label="healthy"), run(label="healthy"), run(label="healthy"), run(label="healthy"),
        run(label="slow"),
        run(label="degraded", onset=100), run(label="degraded", onset=80),
        run(label="diverged", onset=30), run(label="diverged", onset=50),
    ]
    warnings = [
        {"logit_growth": 40, "any": 40}, {}, {}, {},  # one false alarm on a healthy run
        {"tev_growth": 60, "any": 60},  # one on a slow run
        {"logit_growth": 70, "any": 70},  # 30 steps before its onset
        {"logit_growth": 90, "tev_growth": 50, "any": 50},  # logit 10 after, tev 30 before
        {"tev_growth": 20, "any": 20},  # 10 before
        {},  # missed
    ]
    scores = {s.rule: s for s in ws.score_warnings(runs, warnings,
                                                   ["logit_growth", "tev_growth", "any"])}
    logit, tev, union = scores["logit_growth"], scores["tev_growth"], scores["any"]
    assert (logit.unstable, logit.healthy, logit.slow) == (4, 4, 1)
    # logit_growth: warned 1 healthy + 2 unstable; one of those two after the onset
    assert logit.precision == pytest.approx(2 / 3)
    assert logit.recall == pytest.approx(2 / 4)
    assert logit.recall_early == pytest.approx(1 / 4)
    assert logit.false_alarm_rate == pytest.approx(1 / 4)
    assert sorted(logit.leads) == [-10, 30] and logit.median_lead == 10
    # tev_growth: warned 1 slow + 2 unstable, both before
    assert tev.precision == pytest.approx(2 / 3)
    assert tev.recall == pytest.approx(2 / 4) and tev.recall_early == pytest.approx(2 / 4)
    assert tev.false_alarm_rate == 0 and tev.false_slow == 1
    # union: 3 of 4 unstable, all three before their onset; 2 false alarms of 7 warned
    assert union.warned == 5
    assert union.precision == pytest.approx(3 / 5)
    assert union.recall == pytest.approx(3 / 4) and union.recall_early == pytest.approx(3 / 4)
    assert sorted(union.leads) == [10, 30, 30]
    table = "\n".join(ws.score_table([logit, tev, union]))
    assert "| any | 5 | 60% | 75% (3/4) | 75% (3/4) | 25% (1/4) | 1/1 | 30 |" in table


def curve(start: float, end: float, steps: int = 100, bump: tuple[int, int, float] | None = None
          ) -> dict[int, float]:
    """A loss falling linearly from start to end, optionally raised by `bump[2]` on steps
    bump[0]..bump[1]."""
    out = {}
    for s in range(1, steps + 1):
        value = start + (end - start) * (s - 1) / (steps - 1)
        if bump and bump[0] <= s <= bump[1]:
            value += bump[2]
        out[s] = value
    return out


def test_labels_and_onsets_from_the_losses_alone():
    best = run(lr=1e-2, final=4.0, losses=curve(7.0, 4.0))
    near = run(lr=3e-2, final=4.05, losses=curve(7.0, 4.05))
    slow = run(lr=1e-3, final=4.5, losses=curve(7.0, 4.5))
    # departs for good at step 60: flat from there
    late = {s: v if s < 60 else curve(7.0, 4.0)[60] + 0.5 for s, v in curve(7.0, 4.0).items()}
    degraded = run(lr=1e-1, final=5.0, losses=late)
    # a bump in warm-up that it recovers from is not its onset
    bumped = {**late, **{s: late[s] + 1.0 for s in range(5, 10)}}
    degraded_bump = run(lr=3e-1, final=5.0, losses=bumped)
    diverged = run(lr=1.0, status="diverged", losses={1: 7.0, 2: 9.0, 3: 12.0})
    diverged.diverged_step = 12
    other_seed = run(lr=1.0, seed=2, final=6.0, losses=curve(7.0, 6.0))
    runs = [best, near, slow, degraded, degraded_bump, diverged, other_seed]
    ws.label_runs(runs)
    assert [r.label for r in runs] == ["healthy", "healthy", "slow", "degraded", "degraded",
                                       "diverged", "healthy"]
    assert best.onset is None and slow.onset is None
    # the trailing 10-step mean passes the best run's + 0.1 a few steps after step 60
    assert 60 <= degraded.onset <= 62
    assert degraded_bump.onset == degraded.onset
    assert diverged.onset == 2  # its smoothed loss is above the best's from step 2


def logit_records(steps, grow_from: int | None) -> list[dict]:
    """Metric records every 10 steps; the max logit grows 4x per record from `grow_from`."""
    out = []
    for step in steps:
        logit = 10.0 if grow_from is None or step < grow_from else 10.0 * 4 ** (
            (step - grow_from) // 10 + 1)
        out.append({"step": step, "loss": 5.0, "attn_logit_max/layer_01": logit,
                    "attn_entropy_norm/layer_01/min": 0.6})
    return out


def test_score_replays_the_records_through_the_rules():
    quiet = run(label="healthy", records=logit_records(range(10, 201, 10), None))
    loud = run(label="diverged", onset=150, records=logit_records(range(10, 201, 10), 100))
    cfg = dataclasses.replace(WarningConfig(), tev_growth=0.0, update_growth=0.0)
    scores = {s.rule: s for s in ws.score([quiet, loud], cfg)}
    assert scores["logit_growth"].true_positives == 1
    # logit 40 at step 100 is below the floor (50); 160 at step 110 fires: 40 steps ahead
    assert scores["logit_growth"].leads == [40]
    assert scores["any"].false_healthy == 0
    # a grace period past the growth's start delays the warning; persistence delays it too
    late = dataclasses.replace(cfg, grace_steps=130)
    assert ws.score([quiet, loud], late, ["logit_growth"])[0].leads == [20]
    with pytest.raises(ValueError, match="not labelled"):
        ws.score([run()], cfg)


def test_choose_config_prefers_no_false_alarms_then_recall():
    # a healthy run whose logit jumps early (steps 40 and 50) and falls back; an unstable one
    # that grows from step 100: a grace period past 50 silences the first and keeps the
    # second, persistence over two records does not
    healthy_records = logit_records(range(10, 201, 10), None)
    for r in healthy_records:
        if r["step"] in (40, 50):
            r["attn_logit_max/layer_01"] = 200.0
    runs = [run(label="healthy", records=healthy_records),
            run(label="diverged", onset=150, records=logit_records(range(10, 201, 10), 100))]
    base = dataclasses.replace(WarningConfig(), **ws.PREVIOUS_DEFAULTS)
    assert ws.score(runs, base, ["any"])[0].false_healthy == 1
    chosen, union = ws.choose_config(runs, base, {"grace_steps": (0, 60), "persist": (1, 2)})
    assert union.false_healthy == 0 and union.recall_early == 1.0
    assert ws.changed_settings(chosen, base) == {"grace_steps": 60}


def test_load_sweep_reads_committed_series(tmp_path: Path):
    """A results mirror (series.jsonl.gz + sweep_run.json per run) loads with its seed/lr."""
    source = tmp_path / "run"
    source.mkdir()
    lines = [{"step": s, "loss": 7.0 - s / 100, "tokens_per_sec": 1e4} for s in range(1, 51)]
    lines[-1]["val_loss"] = 6.4
    lines.append({"event": "warning", "step": 40, "rule": "tev_growth"})
    (source / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    mirror = tmp_path / "results" / "baseline" / "seed_2" / "lr_0.03"
    write_series(source, mirror / "series.jsonl.gz")
    (mirror / "sweep_run.json").write_text(json.dumps({"status": "done"}))
    (runs,) = ws.load_sweep(tmp_path / "results")
    assert (runs.method, runs.seed, runs.lr, runs.status) == ("baseline", 2, 0.03, "done")
    assert runs.final_loss == 6.4 and len(runs.losses) == 50
    assert "tokens_per_sec" not in runs.records[0]  # not kept in a series
    with pytest.raises(ws.RunLogError, match="no ended run"):
        ws.load_sweep(tmp_path / "run")


@pytest.mark.slow
def test_the_defaults_are_what_the_tuning_chose_on_seed_1():
    """config.WarningConfig's defaults are `choose_config` on the committed seed-1 runs of
    recipes/repro/seeds.yaml (a few minutes: every setting of the grid on 70 runs)."""
    results = Path(__file__).resolve().parents[2] / "docs" / "results" / "seeds"
    runs = [r for r in ws.load_sweep(results) if r.seed == 1]
    assert len(runs) == 70
    ws.label_runs(runs)
    previous = dataclasses.replace(WarningConfig(), **ws.PREVIOUS_DEFAULTS)
    chosen, _ = ws.choose_config(runs, previous)
    assert chosen == WarningConfig()
