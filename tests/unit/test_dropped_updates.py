"""Every dropped update is counted with its reason on every step record, survives a checkpoint,
and a run that keeps dropping them stops (stability.max_skipped_fraction)."""

from __future__ import annotations

import pytest

from stable_megatron.stability.skips import SkipCounter
from stable_megatron.train import TrainingAborted
from tests.unit.test_spike_handling import make_trainer, run_steps, step_with_loss_factor

__all__ = ["make_trainer"]  # the fixture, shared


def test_each_dropped_update_is_counted_with_its_reason(make_trainer):
    trainer = make_trainer("stability.on_spike=skip")
    first = run_steps(trainer, 4)
    assert all(r["skipped_steps"] == 0 and "skip_reason" not in r for r in first)
    nan = step_with_loss_factor(trainer, float("nan"))
    spike = step_with_loss_factor(trainer, 100.0)
    after = trainer.train_one_step()
    assert (nan["skip_reason"], spike["skip_reason"]) == ("non_finite", "spike")
    assert after["skipped_steps"] == 2 and "skip_reason" not in after
    assert (after["skipped_steps/non_finite"], after["skipped_steps/spike"],
            after["skipped_steps/overflow"]) == (1, 1, 0)


def test_the_counts_survive_a_checkpoint(make_trainer):
    trainer = make_trainer("stability.on_spike=skip", "checkpoint.interval=1")
    run_steps(trainer, 4)
    step_with_loss_factor(trainer, float("nan"))
    trainer.save()
    again = make_trainer("stability.on_spike=skip")
    assert again.step == 5 and again.train_one_step()["skipped_steps/non_finite"] == 1


def test_a_run_that_keeps_dropping_updates_stops(make_trainer):
    trainer = make_trainer("stability.on_spike=skip", "stability.window=10",
                           "stability.max_skipped_fraction=0.2")
    run_steps(trainer, 4)
    step_with_loss_factor(trainer, float("nan"))
    step_with_loss_factor(trainer, float("nan"))  # 2 of 10: not more than 0.2
    with pytest.raises(TrainingAborted, match=r"3 of the last 7 optimizer updates were dropped "
                                              r"\(run total by reason: non_finite 3\)"):
        step_with_loss_factor(trainer, float("nan"))


def test_the_stop_rule_counts_a_sliding_window():
    counter = SkipCounter(window=4, max_fraction=0.5)
    for reason in ("overflow", None, "spike", None, None, None):
        counter.observe(reason)
        assert counter.too_many() is None
    for _ in range(2):
        counter.observe("overflow")
    assert counter.too_many() is None  # 2 of 4
    counter.observe("overflow")
    assert "3 of the last 4" in counter.too_many()
    assert counter.fields() == {"skipped_steps": 5, "skipped_steps/overflow": 4,
                                "skipped_steps/spike": 1, "skipped_steps/non_finite": 0,
                                "skipped_steps/replay": 0}
    assert SkipCounter(4, 1.0).too_many() is None


def test_the_run_loop_replays_a_spiked_step(make_trainer, tmp_path):
    """The loop drops a spiked step's update, recomputes it and logs the verdict."""
    import json

    from stable_megatron.model.gpt import lm_loss

    trainer = make_trainer("stability.on_spike=replay", "train.steps=6")
    original, module, faults = trainer.train_one_step, trainer.engine.module, []

    def once_faulty():
        if trainer.step + 1 == 5 and not faults:  # the first attempt of step 5 only
            faults.append(5)
            module.loss_fn = lambda logits, labels: lm_loss(logits, labels) * 100.0
        try:
            return original()
        finally:
            module.loss_fn = lm_loss

    trainer.train_one_step = once_faulty
    trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
             if x]
    replays = [r for r in lines if r.get("event") == "replay"]
    assert [(r["step"], r["verdict"]) for r in replays] == [(5, "not_reproducible")]
    steps = [r["step"] for r in lines if "loss" in r and "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 5, 6]  # step 5's first attempt, then its recomputation
    assert lines[-1]["skipped_steps/replay"] == 1
