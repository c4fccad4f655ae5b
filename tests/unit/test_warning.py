"""Early-warning rules (stable_megatron/stability/warning.py) on synthetic metric records, on
the replay of real tiny-recipe runs (tests/unit/data/), and their config validation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from stable_megatron.analysis.warning_score import PREVIOUS_DEFAULTS
from stable_megatron.config import ConfigError, WarningConfig, config_from_dict, validate
from stable_megatron.stability.warning import EarlyWarning, replay

DATA = Path(__file__).parent / "data"
LAYERS = 2


def healthy(step: int) -> dict[str, float]:
    """A converging run's metrics: logits and TEV creep up, entropy settles around 0.45."""
    t = step / 300
    record: dict[str, float] = {"step": step, "loss": 9.0 - 3.5 * t, "grad_norm": 0.6,
                                "tev/mean": 0.02 * (1 + t), "tev/std": 0.001}
    for layer in range(1, LAYERS + 1):
        name = f"layer_{layer:02d}"
        record[f"attn_logit_max/{name}"] = 0.5 + 35 * min(1.0, 1.5 * t) * (0.8 + 0.1 * layer)
        record[f"attn_entropy_norm/{name}/min"] = 1.0 - 0.55 * min(1.0, 3 * t)
        record[f"attn_entropy/{name}/min"] = 4.0
    return record


def base() -> WarningConfig:
    """The settings the rules' mechanics are tested at (the defaults before issue 21 chose
    new ones on a sweep: every rule on, 3 records before scoring); the current defaults are
    tested at the end of this file."""
    return dataclasses.replace(WarningConfig(), **PREVIOUS_DEFAULTS)


def run(records, **overrides) -> list[tuple[int, str]]:
    cfg = dataclasses.replace(base(), **overrides)
    return [(e.step, e.rule) for e in replay(cfg, records)]


def trace(steps, change):
    """Healthy records at `steps`, with `change(step, record)` applied to each."""
    out = []
    for step in steps:
        record = healthy(step)
        change(step, record)
        out.append(record)
    return out


def test_silent_on_a_healthy_trace():
    assert run(trace(range(5, 1001, 5), lambda s, r: None)) == []


def test_records_without_metrics_are_ignored():
    warn = EarlyWarning(base())
    before = warn.state_dict()
    assert warn.update(7, {"step": 7, "loss": float("nan"), "grad_norm": 3.0}) == []
    assert warn.update(8, {"event": "spike", "step": 8}) == []
    assert warn.state_dict() == before


def test_growing_max_logit_fires_at_the_expected_step():
    growth = {300: 12.0, 310: 25.0, 320: 55.0, 330: 120.0, 340: 260.0}

    def change(step, record):
        if step >= 300:
            record["attn_logit_max/layer_02"] = growth.get(step, 260.0 * 2 ** ((step - 340) / 10))

    records = trace(range(10, 401, 10), change)
    # step 320: 55 >= the floor 50 and 55 / min(window) >= 2; at 310 25 is below the floor
    assert run(records) == [(320, "logit_growth")]
    msg = EarlyWarning(base())
    texts = [t for r in records for t in msg.update(r["step"], r)]
    assert texts[0].startswith("step 320: max attention logit 55 in layer 2 grew")
    assert "logit_growth" in texts[0] and len(texts) == 1  # once for the whole episode


def test_logit_floor_and_growth_thresholds():
    def change(step, record):
        record["attn_logit_max/layer_01"] = 30.0 * 1.02 ** step  # 2x in 35 steps, > 50 at 26

    records = trace(range(5, 101, 5), change)
    # ratio 1.02^35 = 1.9999 at step 40 (window minimum at step 5), 1.02^40 = 2.2 at 45
    assert run(records) == [(45, "logit_growth")]
    assert run(records, logit_growth=4.0) == []  # 2.7x over 50 steps at most
    assert run(records, logit_floor=300.0) == []  # 30 * 1.02^100 = 217 at most


def test_collapsing_entropy_fires_at_the_expected_step():
    fall = {200: 0.45, 205: 0.35, 210: 0.25, 215: 0.15, 220: 0.08}

    def change(step, record):
        if step >= 200:
            record["attn_entropy_norm/layer_01/min"] = fall.get(step, 0.05)
            record["attn_logit_max/layer_01"] = 60.0  # >= logit_floor

    records = trace(range(5, 301, 5), change)
    # 215: 0.15 < 0.2 and < 0.5 * 0.45 (the window's maximum), with logits >= logit_floor
    assert run(records, logit_growth=0) == [(215, "entropy_collapse")]
    warn = EarlyWarning(dataclasses.replace(base(), logit_growth=0))
    texts = [t for r in records for t in warn.update(r["step"], r)]
    assert texts == [texts[0]] and "layer 1" in texts[0] and "0.150 of log(keys)" in texts[0]


def test_a_head_that_sharpens_at_small_logits_does_not_fire():
    """A head specialising early in a healthy run (seen at step ~40 of the tiny recipe): its
    entropy falls from 1 to 0.17, but its logits stay far below logit_floor."""
    def change(step, record):
        record["attn_entropy_norm/layer_01/min"] = max(0.17, 1.0 - 0.03 * step)

    records = trace(range(2, 101, 2), change)
    assert run(records) == []
    assert run(records, logit_floor=0.0, logit_growth=0) == [(28, "entropy_collapse")]


def test_a_head_that_was_always_sharp_does_not_fire():
    records = trace(range(5, 301, 5),
                    lambda s, r: r.update({"attn_entropy_norm/layer_02/min": 0.1}))
    assert run(records) == []


def test_growing_tev_fires_at_the_expected_step():
    def change(step, record):
        if step > 100:
            record["tev/mean"] = healthy(100)["tev/mean"] * (1 + 0.05 * (step - 100))

    records = trace(range(10, 201, 10), change)
    # the window's minimum is the oldest record's: step 110 gives 0.0400 / 0.0240 (step 60)
    # = 1.7x, step 120 0.0533 / 0.0247 (step 70) = 2.2x
    assert run(records) == [(120, "tev_growth")]
    out = dict(healthy(50), **{"tev_out/mean": 1.0})
    assert "tev_out/mean" in EarlyWarning(base())._signals(out)


def test_drifting_output_logits_fire_at_the_expected_step():
    """The mean output logit drifts downwards (the divergence z-loss prevents); the rule fires
    once |mean| is past the floor (20) and twice its smallest |value| in the window."""
    def change(step, record):
        record["output_logit/max"] = 8.0
        record["output_logit/mean"] = -1.0 if step <= 100 else -1.0 - 0.5 * (step - 100)

    records = trace(range(10, 201, 10), change)
    # step 140: |-21| >= 20 and the window (steps 90..130) holds |-1|: fires
    assert run(records) == [(140, "output_logit_drift")]
    assert run(records, output_logit_floor=40) == [(180, "output_logit_drift")]
    assert run(records, output_logit_growth=0) == []
    # a steady large mean (a run whose logits sit at -30 throughout) does not fire
    steady = trace(range(10, 201, 10), lambda s, r: r.update({"output_logit/mean": -30.0}))
    assert run(steady) == []
    nan = trace(range(10, 41, 10), lambda s, r: r.update({"output_logit/mean": math.nan}))
    assert run(nan) == [(10, "output_logit_drift")]


def test_an_update_spike_fires_at_its_step():
    """update_rms (the weight change per unit of LR) of one layer jumps to 4x its median: the
    rule fires at that record; 2.7x does not; the other layer's steady updates never do."""
    def spike(height):
        def change(step, record):
            record["update_rms/layer_01"] = 0.3 * (height if step == 150 else 1.0)
            record["update_rms/layer_02"] = 0.2 + 0.001 * step  # a slow drift
        return change

    assert run(trace(range(10, 201, 10), spike(4.0))) == [(150, "update_spike")]
    assert run(trace(range(10, 201, 10), spike(2.7))) == []
    assert run(trace(range(10, 201, 10), spike(4.0)), update_growth=0) == []
    warn = EarlyWarning(base())
    texts = [t for r in trace(range(10, 201, 10), spike(4.0)) for t in warn.update(r["step"], r)]
    assert texts == ["step 150: update of layer_01 spiked: RMS of the weight change / lr 1.2 is "
                     "4.0x its median over the last 50 steps (update_spike: >= 3x)"]


def test_fires_once_per_episode_and_rearms_after_a_quiet_window():
    def change(step, record):
        value = 20.0
        if 100 <= step < 200:  # first episode: 100 steps of growth
            value = 20.0 * 1.03 ** (step - 100)
        elif 200 <= step < 300:
            value = 20.0 * 1.03 ** 100  # plateau, longer than the window
        elif step >= 300:  # second episode
            value = 20.0 * 1.03 ** 100 * 1.05 ** (step - 300)
        record["attn_logit_max/layer_01"] = value

    events = run(trace(range(5, 401, 5), change))
    assert [rule for _, rule in events] == ["logit_growth", "logit_growth"]
    assert 100 < events[0][0] < 150 and 300 < events[1][0] < 350


def test_no_rearm_while_the_condition_keeps_returning():
    # growth with short dips: the condition is false for less than the window in between
    def change(step, record):
        record["attn_logit_max/layer_01"] = 60.0 * 1.02 ** step * (0.4 if step % 40 == 0 else 1)

    events = run(trace(range(5, 401, 5), change))
    assert events == [(events[0][0], "logit_growth")]


def test_non_finite_metric_fires():
    records = trace(range(5, 51, 5), lambda s, r: None)
    records.append(dict(healthy(55), **{"attn_logit_max/layer_02": float("inf")}))
    warn = EarlyWarning(base())
    texts = [t for r in records for t in warn.update(r["step"], r)]
    assert texts == ["step 55: max attention logit is inf in layer 2"]


def test_each_rule_can_be_switched_off():
    def change(step, record):
        if step >= 100:
            k = (step - 100) // 5
            record["attn_logit_max/layer_01"] = 20.0 * 1.5 ** k
            record["attn_entropy_norm/layer_01/min"] = 0.45 / 1.5 ** k
            record["tev/mean"] = 0.03 * 1.3 ** k

    records = trace(range(5, 201, 5), change)
    rules = {"logit_growth", "entropy_collapse", "tev_growth"}
    assert {rule for _, rule in run(records)} == rules
    assert {rule for _, rule in run(records, logit_growth=0)} == rules - {"logit_growth"}
    assert {rule for _, rule in run(records, entropy_floor=0)} == rules - {"entropy_collapse"}
    assert {rule for _, rule in run(records, tev_growth=0)} == rules - {"tev_growth"}


def test_disabled_is_silent():
    records = [dict(healthy(s), **{"attn_logit_max/layer_01": 1.5 ** s}) for s in range(1, 40)]
    assert run(records)
    assert run(records, enabled=False) == []


def test_a_sparse_metrics_interval_uses_the_last_min_records_records():
    # metrics every 100 steps: no record is in the 50-step window, the last 3 are used
    def change(step, record):
        record["attn_logit_max/layer_01"] = 20.0 * 1.5 ** (step // 100)

    assert run(trace(range(100, 1001, 100), change)) == [(400, "logit_growth")]


def test_state_dict_round_trip_resumes_identically():
    def change(step, record):
        if step >= 150:
            record["attn_logit_max/layer_01"] = 10.0 * 1.04 ** (step - 150)
            record["attn_entropy_norm/layer_02/min"] = max(0.02, 0.45 - 0.01 * (step - 150))
            record["attn_logit_max/layer_02"] = 60.0  # a collapse needs large logits

    records = trace(range(5, 301, 5), change)
    whole = EarlyWarning(base())
    expected = [t for r in records for t in whole.update(r["step"], r)]
    assert len(expected) == 2

    first = EarlyWarning(base())
    got = [t for r in records[:35] for t in first.update(r["step"], r)]
    state = json.loads(json.dumps(first.state_dict()))  # plain Python types only
    second = EarlyWarning(base())
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict()
    got += [t for r in records[35:] for t in second.update(r["step"], r)]
    assert got == expected
    assert second.state_dict() == whole.state_dict()


def test_a_rollback_forgets_the_steps_after_it():
    def change(step, record):
        if step >= 100:
            record["attn_logit_max/layer_01"] = 10.0 * 1.1 ** (step - 100)

    records = trace(range(5, 161, 5), change)
    warn = EarlyWarning(base())
    fired = [r["step"] for r in records if warn.update(r["step"], r)]
    assert len(fired) == 1
    # back to step 100 (a rollback): history from 100 on is dropped, the episode re-arms
    assert max(s for h in warn.history.values() for s, _ in h) == 160
    again = [r["step"] for r in records[19:] if warn.update(r["step"], r)]
    assert again == fired
    assert all(s <= 160 for h in warn.history.values() for s, _ in h)


# ---------------------------------------------------------------------------------------------
# Real runs of recipes/tiny.yaml (docs/stability.md): the divergent high-LR baseline warns
# before its loss diverges; the default-LR run stays silent.


def load_run(name: str) -> list[dict]:
    lines = (DATA / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def first_divergence(records, margin=1.0):
    best = math.inf
    for r in records:
        if not math.isfinite(r["loss"]) or r["loss"] > best + margin:
            return r["step"]
        best = min(best, r["loss"])
    return None


def test_replay_of_the_divergent_run_warns_before_the_loss_diverges():
    # recipes/tiny.yaml at train.lr=3e-1, 100 warmup steps, metrics every step (first 100)
    records = load_run("tiny_divergent")
    events = [(e.step, e.rule) for e in replay(base(), records)]
    assert events == [(7, "logit_growth"), (7, "entropy_collapse"), (8, "tev_growth")]
    assert first_divergence(records) == 8  # 8.15 > 7.13 (step 4) + 1
    assert next(r["step"] for r in records if r["loss"] > records[0]["loss"]) == 9


def test_replay_of_the_healthy_run_is_silent():
    records = load_run("tiny_healthy")
    assert first_divergence(records) is None
    assert replay(base(), records) == []


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("warning", "message"),
    [
        ({"window": 0}, "stability.warning.window"),
        ({"min_records": 0}, "stability.warning.window and stability.warning.min_records"),
        ({"logit_growth": 1.0}, "stability.warning.logit_growth=1.0: must be > 1"),
        ({"tev_growth": 0.5}, "stability.warning.tev_growth=0.5: must be > 1"),
        ({"output_logit_growth": 0.5},
         "stability.warning.output_logit_growth=0.5: must be > 1"),
        ({"output_logit_floor": -1}, "stability.warning.output_logit_floor=-1.0: must be >= 0"),
        ({"update_growth": 1.0}, "stability.warning.update_growth=1.0: must be > 1"),
        ({"logit_floor": -1}, "stability.warning.logit_floor=-1.0: must be >= 0"),
        ({"entropy_floor": 1.5}, "stability.warning.entropy_floor=1.5: must be in"),
        ({"entropy_drop": 0}, "stability.warning.entropy_drop=0.0: must be in"),
    ],
)
def test_invalid_warning_settings_name_the_field(warning, message):
    cfg = config_from_dict({"data": {"vocab_size": 256}, "stability": {"warning": warning}})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(cfg, 1)


def test_default_and_yaml_warning_settings_validate():
    cfg = config_from_dict({"data": {"vocab_size": 256}, "metrics": {"interval": 100},
                            "stability": {"warning": {"logit_floor": 30, "window": 200}}})
    validate(cfg, 1)
    assert cfg.stability.warning.logit_floor == 30.0
    assert EarlyWarning(cfg.stability.warning).update(1, healthy(1)) == []


def test_grace_period_holds_a_warning_until_its_end():
    def grow(step, record):
        if step >= 100:
            record["attn_logit_max/layer_01"] = 60.0 * 2 ** ((step - 100) // 10 + 1)

    records = trace(range(10, 301, 10), grow)
    assert run(records, tev_growth=0.0)[0] == (100, "logit_growth")
    # the condition still holds at the end of the grace period: it fires then, not before
    assert run(records, tev_growth=0.0, grace_steps=150)[0] == (150, "logit_growth")


def test_persistence_needs_the_condition_on_consecutive_records():
    def blip(step, record):
        if step == 100:  # one record out of line, then back
            record["attn_logit_max/layer_01"] = 500.0

    records = trace(range(10, 301, 10), blip)
    assert run(records, tev_growth=0.0) == [(100, "logit_growth")]
    assert run(records, tev_growth=0.0, persist=2) == []

    def grow(step, record):
        if step >= 100:
            record["attn_logit_max/layer_01"] = 60.0 * 2 ** ((step - 100) // 10 + 1)

    assert run(trace(range(10, 301, 10), grow), tev_growth=0.0, persist=2)[0] == \
        (110, "logit_growth")


def test_non_finite_values_fire_despite_grace_and_persistence():
    def nan(step, record):
        if step == 60:
            record["attn_logit_max/layer_02"] = float("nan")

    records = trace(range(10, 301, 10), nan)
    assert (60, "logit_growth") in run(records, grace_steps=200, persist=3)


def test_grace_and_persist_are_validated():
    for bad, match in (({"grace_steps": -1}, "grace_steps"), ({"persist": 0}, "persist")):
        cfg = config_from_dict({"stability": {"warning": bad}})
        with pytest.raises(ConfigError, match=match):
            validate(cfg, 1)


def test_current_defaults_are_quiet_on_healthy_runs_and_warn_on_the_divergent_one():
    """The defaults chosen on the sweep (config.WarningConfig): silent on the healthy trace and
    on the healthy tiny run, and still ahead of the divergent tiny run's loss."""
    cfg = WarningConfig()
    assert replay(cfg, trace(range(5, 1001, 5), lambda s, r: None)) == []
    assert replay(cfg, load_run("tiny_healthy")) == []
    records = load_run("tiny_divergent")
    first = min(e.step for e in replay(cfg, records))
    assert first < first_divergence(records)
