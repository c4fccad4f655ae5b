"""The training loop: config -> data -> model -> DeepSpeed engine -> steps -> logs/checkpoints.
The engine and optimizer live in `stable_megatron/engine.py`, the data and micro-batches in
`stable_megatron/batches.py` (their names are re-exported here).

Run with a launcher (`deepspeed --num_gpus N -m stable_megatron.train RECIPE k=v ...`,
`torchrun`) or as a single process (`python -m stable_megatron.train RECIPE`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

from stable_megatron.batches import (  # noqa: F401  (re-exported)
    DataSources,
    evaluate,
    micro_batches,
    resolve_data,
)
from stable_megatron.config import Config, ConfigError, dump_config, load_config, validate
from stable_megatron.data import DataError
from stable_megatron.engine import (  # noqa: F401  (re-exported)
    DS_REDUCE_BUCKET,
    build_engine,
    deepspeed_config,
    lr_at,
    make_optimizer,
    param_groups,
    train_step,
)
from stable_megatron.logger import RunLogger


class TrainingAborted(RuntimeError):
    """The run stopped itself, with the reason for the user (e.g. too many rollbacks)."""


class Trainer:
    """One training run: data, engine, checkpoints, spike handling and the loop. `run()` trains
    to `train.steps`; the steps, saves and rollbacks are methods so tests can drive them."""

    def __init__(self, cfg: Config) -> None:
        from stable_megatron import checkpoint as ckpt
        from stable_megatron import parallel
        from stable_megatron.checkpoint import reshape
        from stable_megatron.data.dataset import TokenWindowDataset
        from stable_megatron.hooks import StepRunner
        from stable_megatron.resume import StartFinder
        from stable_megatron.stability.divergence import DivergenceRule
        from stable_megatron.stability.guard import SpikeGuard
        from stable_megatron.stability.skips import SkipCounter
        from stable_megatron.stability.warning import EarlyWarning

        self.cfg = cfg
        self._before_step = None  # (step, consumed, RNG states) before the step (replay)
        self.watchdog = None  # started by run()
        starts = StartFinder(cfg)
        # Data and checkpoint problems surface here, before any process group exists.
        self.sources = resolve_data(cfg)
        seq = cfg.model.seq_length
        self.train_ds = self.val_ds = None
        if self.sources.train_prefix is not None:
            self.train_ds = TokenWindowDataset(self.sources.train_prefix, seq,
                                               seed=cfg.train.seed)
        if self.sources.val_prefix and cfg.train.eval_interval:
            self.val_ds = TokenWindowDataset(self.sources.val_prefix, seq, seed=cfg.train.seed)
        start = starts.find()
        self.state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.device,
                                         cfg.parallel.timeout_minutes)
        self.layout, self.device = self.state.layout, self.state.device
        starts.check_writable(self.layout)
        start = starts.verify_checksums(start, self.layout)
        if self.train_ds is None:  # megatron-core's datasets: built (rank 0) after the groups
            from stable_megatron.data import blend
            from stable_megatron.data.tokenizer import Tokenizer

            tok = Tokenizer(self.sources.tokenizer_model)
            self.train_ds, self.val_ds = blend.build(cfg, self.sources.tokenizer_model,
                                                     tok.eod_id, tok.vocab_size)
        if start is not None:
            self._check_layout(*start)
        self.step, self.consumed, self.rollbacks, self.lr_scale = 0, 0, 0, 1.0
        self.engine = build_engine(cfg, self.state, lambda: self.lr_scale)
        ckpt.install_safe_loading(self.engine)
        reshape.attach_universal_checkpoint_info(self.engine, cfg)  # saved with checkpoints
        self.guard = SpikeGuard(cfg, self.state, self.engine)
        self.skips = SkipCounter(cfg.stability.window, cfg.stability.max_skipped_fraction)
        self.warning = EarlyWarning(cfg.stability.warning)
        self.divergence = DivergenceRule(cfg.stability.divergence_patience)
        self.diverged: str | None = None  # why the run stopped, under stop_on_divergence
        self.accum = self.engine.gradient_accumulation_steps()
        self.metrics = None
        if cfg.metrics.interval:
            from stable_megatron.metrics import StabilityMetrics

            self.metrics = StabilityMetrics(cfg, self.state, self.engine)
        self.hooks = StepRunner(self.engine, self._step_hooks())
        self.started_from = None
        if start is not None:
            self._restore(start[0], start[1], weights_only=start[2])
            self.started_from = start[0]
        self.start_step = self.step
        self.log = RunLogger(cfg, enabled=self.state.is_logging_rank, start_step=self.step)
        for event in starts.events:  # found before the logger existed (corruption)
            self.log.log({"step": self.step, **event})
        self.last_verdict, self.last_measured = None, False

    def _step_hooks(self) -> list:
        """Every step hook of the run, in order: `before_step` runs them in this order and
        `after_step` in reverse, so the timer times every hook, and the warning and divergence
        rules read the metrics, the guard's verdict and the loss. The stability methods' hooks
        come from the registry (`methods.hooks`)."""
        from stable_megatron import methods
        from stable_megatron.hooks import Throughput

        cfg = self.cfg
        return [
            Throughput(cfg, self.layout.world, self.device), self.warning, self.divergence,
            *methods.hooks(cfg, self.engine.module, self.state, self.engine), self.guard,
            *([self.metrics] if self.metrics is not None else []),
        ]

    # ---------------------------------------------------------------- checkpoints

    def _check_layout(self, tag_dir, meta, weights_only) -> None:
        from stable_megatron.checkpoint import reshape

        if reshape.is_reshape(meta, self.layout, self.cfg.parallel.zero_stage):
            # another layout or ZeRO stage: DeepSpeed's universal checkpoint (reshape.py)
            reshape.check_reshape(tag_dir, meta, self.cfg, self.layout, weights_only)

    def _restore(self, tag_dir, meta, weights_only: bool = False) -> None:
        from stable_megatron import checkpoint as ckpt
        from stable_megatron.checkpoint import reshape

        stage = self.cfg.parallel.zero_stage
        # weights only under ZeRO-3: from the layer files, as at another layout (DeepSpeed's own
        # ZeRO-3 weights-only load rebuilds them from its flat optimizer files, not ours)
        resharded = reshape.is_reshape(meta, self.layout, stage) or (weights_only and stage == 3)
        load = reshape.load if resharded else ckpt.load
        client = load(self.engine, self.cfg, self.layout, tag_dir, meta, weights_only)
        if weights_only:
            return
        self.step, self.consumed = client["step"], client["consumed_samples"]
        self.rollbacks = client.get("rollbacks", 0)
        self.lr_scale = client.get("lr_scale", 1.0)
        self._apply_lr_scale()  # the LR of the restored schedule (a ZeRO-3 reshape needs it)
        self.skips.load_state_dict(client.get(self.skips.state_key, {}))
        self.hooks.load_state_dict(client)

    def client_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            self.skips.state_key: self.skips.state_dict(),
            **self.hooks.state_dict(),
        }

    def save(self) -> None:
        from stable_megatron import checkpoint as ckpt

        with self._phase("checkpoint save"):
            result = ckpt.save(self.engine, self.cfg, self.layout, self.cfg.checkpoint_dir,
                               self.step, self.client_state())
        removed = f"; removed {', '.join(result.removed)}" if result.removed else ""
        self.log.info(f"saved checkpoint {result.tag_dir} in {result.seconds:.1f}s{removed}")

    # ---------------------------------------------------------------- spikes

    def rollback(self) -> dict:
        """Reload the latest checkpoint, keep the data position past the batches seen since it
        (the spike's included), optionally lower the LR. Every rank calls this."""
        from stable_megatron import checkpoint as ckpt

        s = self.cfg.stability
        spike_step, data_position = self.step, self.consumed
        rollbacks, lr_scale = self.rollbacks + 1, self.lr_scale * s.rollback_lr_factor
        if rollbacks > s.max_rollbacks:
            raise TrainingAborted(
                f"step {spike_step}: loss/grad-norm spike after {s.max_rollbacks} rollbacks "
                f"(stability.max_rollbacks); giving up. The last checkpoint is "
                f"{ckpt.newest_complete(self.cfg.checkpoint_dir)}; consider a lower train.lr, "
                f"stability.rollback_lr_factor < 1, or a stability method (recipes/methods/)"
            )
        target = ckpt.newest_complete(self.cfg.checkpoint_dir)
        if target is None:
            raise TrainingAborted(
                f"step {spike_step}: spike, but no checkpoint to roll back to yet in "
                f"{self.cfg.checkpoint_dir} (checkpoint.interval={self.cfg.checkpoint.interval})"
            )
        meta = ckpt.read_meta(target)
        ckpt.verify(target, meta)
        skips = self.skips.state_dict()  # the dropped updates stay counted across a rollback
        with self._phase("rollback"):
            self._restore(target, meta)
        self.skips.load_state_dict(skips)
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        skipped = (self.consumed, data_position)
        self.consumed = data_position
        self._apply_lr_scale()
        event = {
            "step": spike_step, "event": "rollback", "to_step": self.step,
            "checkpoint": str(target), "skipped_samples": list(skipped),
            "rollbacks": rollbacks, "lr_scale": lr_scale,
        }
        self.log.info(
            f"step {spike_step}: rolled back to {target.name} (step {self.step}); skipping "
            f"samples {skipped[0]}..{skipped[1] - 1}; LR x{lr_scale:g}; rollback {rollbacks} of "
            f"at most {s.max_rollbacks}"
        )
        return event

    def _apply_lr_scale(self) -> None:
        """Set the optimizer's LR now (the scheduler applies `lr_scale` from its next step)."""
        scheduler = self.engine.lr_scheduler
        lrs = [base * fn(scheduler.last_epoch)
               for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(self.engine.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    # ---------------------------------------------------------------- steps

    def train_one_step(self) -> dict:
        """One optimizer step (or a dropped one); returns its log record."""
        cfg, engine = self.cfg, self.engine
        step = self.step + 1
        if cfg.stability.on_spike == "replay":  # what a replay of this step starts from
            from stable_megatron.checkpoint.save import rng_state

            self._before_step = (self.step, self.consumed, rng_state())
        lr = engine.get_lr()[0]
        self.last_measured = self.metrics is not None and self.metrics.due(step)
        skipped_before = engine.skipped_steps
        batches = micro_batches(self.train_ds, self.consumed, cfg, self.layout, self.device,
                                self.accum)
        loss = self.hooks.step(step, batches)
        self.step = step
        self.consumed += cfg.train.global_batch_size
        record = {
            "step": step,
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm()),
            "consumed_tokens": self.consumed * cfg.model.seq_length,
        }
        dropped = engine.skipped_steps > skipped_before
        if dropped:
            record["update_skipped"] = 1
        self.hooks.after_step(step, record)
        self.last_verdict = self.guard.verdict
        reason = None
        if dropped:  # by the guard, or by DeepSpeed itself (non-finite gradients)
            reason = self.guard.dropped_by or "overflow"
            record["skip_reason"] = reason
        self.skips.observe(reason)
        record.update(self.skips.fields())
        why = self.skips.too_many()
        if why is not None:
            raise TrainingAborted(f"step {step}: {why}")
        return record

    def _on_spike(self, record: dict) -> bool:
        """Log the spike and act on it; True when the run rolled back."""
        verdict, action = self.last_verdict, self.cfg.stability.on_spike
        dropped = "update_skipped" in record
        self.log.info(
            f"step {self.step}: spike: {'; '.join(verdict.reasons)} -> {action}"
            + (" (update dropped)" if dropped else "")
        )
        self.log.log({"step": self.step, "event": "spike", "action": action,
                      "reasons": verdict.reasons, "update_dropped": int(dropped)})
        if action != "rollback":
            return False
        self.log.log(self.rollback())
        return True

    def replay(self, first: dict) -> dict:
        """Recompute the step of `first` (a spiked record whose update was dropped) from the
        same state on the same batch: the weights and optimizer are as before it, and the
        step, data position and RNG states are put back. Logs the verdict as a `replay` event;
        returns the recomputed step's record. Every rank calls this."""
        from stable_megatron.checkpoint.save import set_rng_state

        step, consumed, rng = self._before_step
        samples = [consumed, consumed + self.cfg.train.global_batch_size]
        self.step, self.consumed = step, consumed
        set_rng_state(rng)
        self.guard.replaying, self.guard.replay_result = self.last_verdict, None
        try:
            record = self.train_one_step()
        finally:
            self.guard.replaying = None
        verdict, self.guard.replay_result = self.guard.replay_result, None
        event = {"step": self.step, "event": "replay", "verdict": verdict,
                 "loss": first["loss"], "replay_loss": record["loss"],
                 "grad_norm": first["grad_norm"], "replay_grad_norm": record["grad_norm"]}
        if verdict == "reproducible":  # the data: the batch is skipped, as a rollback does
            event["skipped_samples"] = samples
        self.log.log(event)
        self.log.info(f"step {self.step}: replayed: {verdict.replace('_', ' ')}"
                      + (f"; samples {samples[0]}..{samples[1] - 1} skipped"
                         if verdict == "reproducible" else "; the recomputed step goes on"))
        return record

    def _early_warning(self) -> None:
        """Print and log the trend rules that fired at the last step."""
        for event in self.warning.events:
            self.log.info(f"early warning: {event.message}")
            self.log.log({"step": event.step, "event": "warning", "rule": event.rule,
                          "signal": event.signal, "message": event.message})

    def _stop_diverged(self, reason: str) -> None:
        self.diverged = reason
        self.log.log({"step": self.step, "event": "diverged", "reason": reason,
                      "initial_loss": self.divergence.initial_loss,
                      "patience": self.cfg.stability.divergence_patience})
        self.log.info(f"step {self.step}: stopping: the loss diverged ({reason}; "
                      f"stability.stop_on_divergence)")

    def run(self) -> dict:
        """Train to `train.steps` under the step watchdog (`parallel.watchdog`)."""
        from stable_megatron.watchdog import StepWatchdog

        p = self.cfg.parallel
        if p.watchdog:
            self.watchdog = StepWatchdog(self.cfg.train.run_dir, self.layout.rank,
                                         self.layout.world, p.watchdog_factor,
                                         p.watchdog_floor_s)
            self.watchdog.step = self.step + 1
            self.watchdog.start()
        try:
            return self._run()
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()

    def _phase(self, name: str):
        """A phase the watchdog bounds by its floor (a save, an evaluation, a rollback)."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.during(name)

    def _run(self) -> dict:
        from stable_megatron.data.dataset import unigram_perplexity

        cfg, layout, log = self.cfg, self.layout, self.log
        if self.state.is_logging_rank:
            Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
            dump_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
        log.info(
            f"stable_megatron: world {layout.world} = tp {layout.tp} x pp {layout.pp} x "
            f"dp {layout.dp} on {self.device}; run dir {cfg.train.run_dir}"
            + (f"; resumed at step {self.step} from {self.started_from}" if self.step else "")
            + (f"; weights from {self.started_from}" if self.started_from and not self.step
               else "")
        )
        if self.val_ds is not None and self.state.is_logging_rank and self.sources.val_prefix:
            s = self.sources
            baseline = unigram_perplexity(s.train_prefix, s.val_prefix, s.vocab_size)
            log.info(f"validation baseline: unigram perplexity {baseline:.1f}")
        last: dict = {}
        while self.step < cfg.train.steps:
            started = time.monotonic()
            record = self.train_one_step()
            if self.watchdog is not None:
                self.watchdog.step_done(self.step, time.monotonic() - started)
            if self.last_verdict.is_spike and self._on_spike(record):
                log.log(record)
                continue
            if self.last_verdict.is_spike and cfg.stability.on_spike == "replay":
                log.log(record)  # the first attempt, its update dropped
                record = self.replay(record)
            step = self.step
            evaluate_now = self.val_ds is not None and (
                step % cfg.train.eval_interval == 0 or step == cfg.train.steps
            )
            if evaluate_now:
                with self._phase("evaluation"):
                    val_loss = evaluate(self.engine, self.val_ds, cfg, layout, self.device)
                record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            reason = self.divergence.reason if cfg.stability.stop_on_divergence else None
            if evaluate_now or self.last_measured or step % cfg.train.log_interval == 0 or \
                    step in (1, cfg.train.steps) or self.last_verdict.is_spike or reason:
                log.log(record)
            self._early_warning()
            last = record
            if reason:
                self._stop_diverged(reason)
                break
            interval = cfg.checkpoint.interval
            exiting = cfg.train.exit_interval and step - self.start_step >= cfg.train.exit_interval
            if (interval and step % interval == 0) or step == cfg.train.steps or exiting:
                self.save()
            if exiting:
                log.info(f"exit_interval reached: stopping at step {step}; run again to resume")
                break
        if not self.diverged:
            log.info(f"done: {self.step} steps; logs in {cfg.train.run_dir}/metrics.jsonl"
                     f" (TensorBoard: tensorboard --logdir {cfg.train.run_dir})")
        log.close()
        return last


def train(cfg: Config) -> dict:
    """Train per `cfg` (already validated); returns the last logged record. Starts the process
    groups if needed; the caller ends them (`parallel.shutdown`), so that one process can run
    several trainings."""
    return Trainer(cfg).run()

def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends `--local_rank=N`; LOCAL_RANK in the environment says it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank"):
            skip = arg == "--local_rank"
            continue
        out.append(arg)
    return out


USAGE = "usage: stable-megatron train RECIPE [key=value ...]   e.g. train.steps=20 parallel.tp=2"


def main(argv: list[str] | None = None) -> int:
    args = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    recipe, overrides = args[0], args[1:]
    from stable_megatron import parallel
    from stable_megatron.checkpoint import CheckpointError

    try:
        cfg = load_config(recipe, overrides)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
