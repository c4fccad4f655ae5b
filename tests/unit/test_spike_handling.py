"""Spike handling (stability.on_spike) on a real engine in one process: an injected NaN or
loss spike, then the weights, the optimizer state and the data position it must leave."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from stable_megatron import ds_adapter, parallel
from stable_megatron.checkpoint import safe_load
from stable_megatron.config import load_config, validate
from stable_megatron.model.gpt import lm_loss
from stable_megatron.stability.spikes import SpikeDetector
from stable_megatron.train import Trainer, TrainingAborted

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1024", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=2", "train.eval_interval=0",
    "train.log_interval=1", "metrics.interval=0", "logging.tensorboard=false",
    "logging.progress=false", "stability.min_history=3", "stability.loss_k=6",
]


@pytest.fixture
def make_trainer(tmp_path, data_cache):
    def make(*overrides: str) -> Trainer:
        cfg = load_config(ROOT / "recipes" / "tiny.yaml", [
            *SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={tmp_path / 'run'}",
            *overrides,
        ])
        validate(cfg, 1)
        return Trainer(cfg)

    yield make
    parallel.shutdown()


def master_weights(opt) -> list[torch.Tensor]:
    """ZeRO's fp32 master partitions (stages 1-2, stage 3); at stage 0 the weights are the
    master (`weights`), and the first tensor of this list is the first parameter."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(opt, name):
            return [p.detach().clone() for p in getattr(opt, name)]
    return [p.detach().clone() for group in opt.param_groups for p in group["params"]]


def snapshot(trainer: Trainer) -> dict:
    opt = trainer.engine.optimizer
    module = trainer.engine.module
    with ds_adapter.gathered(module.parameters()):  # whole under ZeRO-3
        weights = copy.deepcopy(module.state_dict())
    return {
        "weights": weights,
        "master": master_weights(opt),
        # (not state_dict(): ZeRO-3 empties the base optimizer's groups between its steps)
        "adam": copy.deepcopy(list(opt.optimizer.state.values())),
        "lr_step": trainer.engine.lr_scheduler.last_epoch,
        "consumed": trainer.consumed,
        "step": trainer.step,
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key, value in a["weights"].items():
        if isinstance(value, torch.Tensor):  # (megatron-core's _extra_state entries are None)
            assert torch.equal(value, b["weights"][key]), key
    for x, y in zip(a["master"], b["master"], strict=True):
        assert torch.equal(x, y)
    assert len(a["adam"]) == len(b["adam"]) > 0
    for state_a, state_b in zip(a["adam"], b["adam"], strict=True):
        assert state_a.keys() == state_b.keys()
        for name, value in state_a.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[name]))
    assert a["lr_step"] == b["lr_step"]


def step_with_loss_factor(trainer: Trainer, factor: float) -> dict:
    """One step whose loss (and so its gradients) is multiplied by `factor`."""
    module = trainer.engine.module
    module.loss_fn = lambda logits, labels: lm_loss(logits, labels) * factor
    try:
        return trainer.train_one_step()
    finally:
        module.loss_fn = lm_loss


def run_steps(trainer: Trainer, n: int) -> list[dict]:
    return [trainer.train_one_step() for _ in range(n)]


@pytest.mark.parametrize("fault,optimizer,zero", [
    ("nan", "adamw", 1), ("spike", "adamw", 1), ("spike", "muon", 1),
    # the other ZeRO stages decide at other points of DeepSpeed's step (ds_adapter.UpdateGate)
    ("nan", "adamw", 0), ("spike", "adamw", 0), ("nan", "adamw", 3), ("spike", "adamw", 3),
])
def test_skip_drops_exactly_the_update(make_trainer, fault, optimizer, zero):
    """(With Muon, "Adam moments" are Muon's momentum and the AdamW groups' moments.)"""
    trainer = make_trainer("stability.on_spike=skip", f"train.optimizer={optimizer}",
                           f"parallel.zero_stage={zero}")
    healthy = run_steps(trainer, 4)
    assert all(not trainer.guard.detector.check_loss(r["loss"]).is_spike for r in healthy)
    before = snapshot(trainer)
    record = step_with_loss_factor(trainer, float("nan") if fault == "nan" else 100.0)
    verdict = trainer.last_verdict
    assert verdict.is_spike and record["update_skipped"] == 1
    assert ("non-finite loss" if fault == "nan" else "std above") in verdict.reasons[0]
    after = snapshot(trainer)
    assert_same_state(before, after)  # weights, ZeRO master weights, Adam moments, LR step
    assert after["consumed"] == before["consumed"] + 4  # the bad batch is consumed
    assert after["step"] == before["step"] + 1
    # The spike did not enter the history, and the next step trains normally.
    assert list(trainer.guard.detector.losses) == [r["loss"] for r in healthy]
    nxt = trainer.train_one_step()
    assert "update_skipped" not in nxt and not trainer.last_verdict.is_spike
    assert not torch.equal(snapshot(trainer)["master"][0], after["master"][0])


def test_log_mode_applies_a_finite_spike(make_trainer):
    trainer = make_trainer("stability.on_spike=log")
    run_steps(trainer, 4)
    before = snapshot(trainer)
    record = step_with_loss_factor(trainer, 100.0)
    assert trainer.last_verdict.is_spike and "update_skipped" not in record
    assert record["spike_score"] > 6
    assert not torch.equal(snapshot(trainer)["master"][0], before["master"][0])


def test_grad_norm_spike_is_judged_before_the_update(make_trainer):
    # The loss is scaled after the loss check would pass only if loss_k is huge: isolate the
    # grad-norm rule by making the loss rule unreachable.
    trainer = make_trainer("stability.on_spike=skip", "stability.loss_k=1e9",
                           "stability.grad_norm_k=6")
    run_steps(trainer, 4)
    before = snapshot(trainer)
    record = step_with_loss_factor(trainer, 100.0)
    assert trainer.last_verdict.is_spike and record["update_skipped"] == 1
    assert "grad norm" in trainer.last_verdict.reasons[0]
    assert_same_state(before, snapshot(trainer))


@pytest.mark.parametrize("optimizer,zero", [("adamw", 1), ("muon", 1), ("adamw", 3)])
def test_rollback_restores_the_checkpoint_and_skips_the_batches(make_trainer, tmp_path,
                                                                optimizer, zero):
    trainer = make_trainer("stability.on_spike=rollback", "checkpoint.interval=2",
                           "stability.rollback_lr_factor=0.5", "train.steps=8",
                           f"train.optimizer={optimizer}", f"parallel.zero_stage={zero}")
    run_steps(trainer, 4)
    trainer.save()
    at_checkpoint = snapshot(trainer)
    lr_before = trainer.engine.get_lr()[0]
    run_steps(trainer, 1)  # step 5 trains normally, then step 6 spikes
    record = step_with_loss_factor(trainer, 100.0)
    assert trainer.last_verdict.is_spike and record["update_skipped"] == 1
    event = trainer.rollback()
    restored = snapshot(trainer)
    assert_same_state(at_checkpoint, restored)
    assert trainer.step == 4
    assert trainer.consumed == 6 * 4  # samples of steps 5 and 6 are skipped
    assert event["skipped_samples"] == [16, 24] and event["to_step"] == 4
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert trainer.engine.get_lr()[0] == pytest.approx(lr_before * 0.5, rel=1e-12)
    nxt = trainer.train_one_step()
    assert nxt["step"] == 5 and nxt["lr"] == pytest.approx(lr_before * 0.5, rel=1e-12)
    assert nxt["consumed_tokens"] == 7 * 4 * 32


def test_rollback_gives_up_after_max_rollbacks(make_trainer):
    trainer = make_trainer("stability.on_spike=rollback", "checkpoint.interval=2",
                           "stability.max_rollbacks=1", "train.steps=20")
    run_steps(trainer, 4)
    trainer.save()
    for attempt in range(2):
        step_with_loss_factor(trainer, float("nan"))
        if attempt == 0:
            trainer.rollback()
        else:
            with pytest.raises(TrainingAborted, match="after 1 rollbacks"):
                trainer.rollback()


def test_run_loop_logs_spike_and_rollback_events(make_trainer, tmp_path):
    trainer = make_trainer("stability.on_spike=rollback", "checkpoint.interval=3",
                           "train.steps=7")
    original = trainer.train_one_step
    calls = {"n": 0}

    def faulty_step():
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th step taken (step 5) is a NaN
            return step_with_loss_factor_inner(trainer, original)
        return original()

    trainer.train_one_step = faulty_step
    trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in lines if "event" in r]
    assert [e["event"] for e in events] == ["spike", "rollback"]
    assert events[1]["to_step"] == 3 and events[1]["skipped_samples"] == [12, 20]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 4, 5, 6, 7]  # steps 4-5 retrained on later data
    assert trainer.step == 7 and trainer.consumed == 9 * 4


def step_with_loss_factor_inner(trainer: Trainer, step_fn) -> dict:
    module = trainer.engine.module
    module.loss_fn = lambda logits, labels: lm_loss(logits, labels) * float("nan")
    try:
        return step_fn()
    finally:
        module.loss_fn = lm_loss


def test_detector_state_survives_a_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer("checkpoint.interval=2", "train.steps=4")
    trainer.run()
    history = list(trainer.guard.detector.losses)
    assert len(history) == 4
    parallel.shutdown()
    resumed = make_trainer("checkpoint.interval=2", "train.steps=4")
    assert resumed.step == 4 and list(resumed.guard.detector.losses) == history


def test_detector_scores_against_the_running_window():
    det = SpikeDetector(window=4, min_history=3, loss_k=3.0, grad_norm_k=0.0)
    for loss in (5.0, 5.1, 4.9):
        verdict = det.check_loss(loss)
        assert not verdict.is_spike
        det.accept(det.check_grad_norm(verdict, 1.0))
    verdict = det.check_loss(5.05)
    assert verdict.loss_mean == pytest.approx(5.0) and verdict.loss_std == pytest.approx(0.1)
    assert verdict.spike_score == pytest.approx(0.5) and not verdict.is_spike
    assert det.check_loss(5.5).is_spike  # 5 std
    assert det.check_loss(float("inf")).is_spike
    assert not det.check_grad_norm(det.check_loss(5.0), 1e6).is_spike  # grad_norm_k=0: off
    assert det.check_grad_norm(det.check_loss(5.0), float("nan")).is_spike
    for loss in (5.0, 5.0, 5.0, 5.0):  # the window slides: only the last 4 count
        det.accept(det.check_grad_norm(det.check_loss(loss), 1.0))
    assert list(det.losses) == [5.0] * 4
    restored = SpikeDetector(window=4, min_history=3, loss_k=3.0)
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert restored.check_loss(5.0).spike_score == det.check_loss(5.0).spike_score


def test_early_warning_is_logged_and_checkpointed(make_trainer, tmp_path):
    """Wiring: the trainer feeds every record to the trend rules, logs a firing rule as an
    event, and saves the rules' state with the checkpoint (the rules: test_warning.py)."""
    trainer = make_trainer("metrics.interval=1", "train.steps=6", "checkpoint.interval=6",
                           "stability.warning.logit_growth=1.01",
                           "stability.warning.logit_floor=0")
    trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in lines if r.get("event") == "warning"]
    assert warnings and warnings[0]["rule"] == "logit_growth"
    assert warnings[0]["message"].startswith(f"step {warnings[0]['step']}: max attention logit")
    assert len({w["rule"] for w in warnings}) == len(warnings)  # once per episode
    client = safe_load(tmp_path / "run" / "checkpoints" / "step00000006" /
                       "mp_rank_00_model_states.pt")
    assert client["early_warning"] == trainer.warning.state_dict()
    assert client["early_warning"]["last_step"] == 6
