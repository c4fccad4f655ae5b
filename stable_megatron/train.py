"""The training loop: config -> data -> model -> DeepSpeed engine -> steps -> logs/checkpoints.

Run with a launcher (`deepspeed --num_gpus N -m stable_megatron.train RECIPE k=v ...`,
`torchrun`) or as a single process (`python -m stable_megatron.train RECIPE`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stable_megatron.config import Config, ConfigError, dump_config, load_config, validate
from stable_megatron.data import DataError
from stable_megatron.logger import RunLogger


@dataclass
class DataSources:
    train_prefix: str | None  # None: data.source=blended (data/blend.py)
    val_prefix: str | None
    tokenizer_model: str
    vocab_size: int


def resolve_data(cfg: Config) -> DataSources:
    """Prepare (built-in corpus, cached) or check (user data) the data of a validated config."""
    from stable_megatron.data.dataset import prepare_builtin_data
    from stable_megatron.data.tokenizer import Tokenizer

    d = cfg.data
    if d.source == "builtin":
        paths = prepare_builtin_data(d.cache_dir, vocab_size=d.vocab_size)
        sources = DataSources(
            str(paths.train_prefix), str(paths.val_prefix), str(paths.tokenizer_model),
            paths.vocab_size,
        )
    elif d.source == "blended":
        vocab = Tokenizer(d.tokenizer_model).vocab_size
        sources = DataSources(None, None, d.tokenizer_model, vocab)
    else:
        vocab = Tokenizer(d.tokenizer_model).vocab_size
        sources = DataSources(d.train_prefix, d.val_prefix, d.tokenizer_model, vocab)
    if sources.vocab_size != cfg.tokenizer_vocab_size:
        raise DataError(
            f"{sources.tokenizer_model}: {sources.vocab_size} tokens, but the validated config "
            f"says data.vocab_size={cfg.tokenizer_vocab_size}"
        )
    return sources


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate after `step` optimizer steps: linear warmup, then decay to min_lr."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_decay == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.lr_decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.min_lr + (t.lr - t.min_lr) * factor


def param_groups(model: torch.nn.Module, weight_decay: float,
                 decay_embeddings: bool = True, linear_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only; biases and norm weights (1-D) are not decayed, nor, with
    `decay_embeddings=False`, the embedding tables (word and position: every `nn.Embedding`
    and megatron-core `VocabParallelEmbedding`, so also a tied output layer). With `linear_lr`,
    the matrices that are not embedding tables (the linear layers' weights) form a third group
    of their own, with that LR."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    tables = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, VocabParallelEmbedding)):
            tables.update(id(p) for p in module.parameters())
    decay, no_decay, linear = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        table = id(param) in tables
        if param.dim() < 2 or (table and not decay_embeddings):
            no_decay.append(param)
        elif not table and linear_lr is not None:
            linear.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if linear_lr is not None:
        groups.append({"params": linear, "weight_decay": weight_decay, "lr": linear_lr})
    return groups


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """The AdamW of `cfg.train` over `param_groups(model)`, with torch's fused kernel
    (`fused=True`) on CUDA and on CPU: one pass over each parameter with no temporaries, instead
    of the per-parameter loop's half-dozen full-size temporaries per step. Under ZeRO-1 the
    optimizer sees one flat fp32 partition per parameter group, so each temporary was the size
    of the whole model (116 MB at the benchmark's medium shape): the loop took 430 ms of a 4.3 s
    CPU step there, the fused kernel ~30 ms (docs/performance.md). The two agree to rounding
    (tests/unit/test_optimizer.py). The CPU results in docs/results.md were measured with the
    loop (`foreach=False`), the CPU kernel until issue 13."""
    t = cfg.train
    linear_lr = t.lr * t.linear_lr_scale if t.linear_lr_scale != 1.0 else None
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay, t.embedding_weight_decay, linear_lr),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        fused=True,
    )


# DeepSpeed's default for ZeRO's gradient bucket, in elements
DS_REDUCE_BUCKET = 500_000_000


def deepspeed_config(cfg: Config, dp: int, stage_params: int = DS_REDUCE_BUCKET) -> dict:
    """The engine's config. `stage_params`, the number of parameters on this rank, caps ZeRO's
    gradient bucket: with pipeline parallelism DeepSpeed allocates a fresh bucket of
    `reduce_bucket_size` elements every step (2 GB of fp32 at its default of 5e8, for a model
    of a few million parameters here), and the part the gradients fill is faulted in anew each
    step on CPU and held by the caching allocator on GPU. A bucket as large as the stage's
    parameters groups the reduction exactly as the default does for any stage under 5e8."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage,
                              "reduce_bucket_size": max(1, min(stage_params, DS_REDUCE_BUCKET))},
        # check_grad_overflow: drop (not apply) a bf16 step with inf/NaN gradients, as fp32 does
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(cfg: Config, state, lr_scale=None):
    """The DeepSpeed pipeline engine; `lr_scale()` (default 1) multiplies the LR schedule
    (rollbacks lower it)."""
    import deepspeed

    from stable_megatron.model.gpt import build_model

    model = build_model(cfg, state.topology, state.device).to(state.device)
    t = cfg.train
    optimizer = make_optimizer(model, cfg)
    scale = lr_scale or (lambda: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(cfg, s) / t.lr * scale()
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, state.layout.dp, sum(p.numel() for p in model.parameters())),
    )
    return engine


def micro_batches(
    dataset, first_sample: int, cfg: Config, layout, device: torch.device, count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The `count` micro-batches this data-parallel rank trains on in one step.

    Global sample `first_sample + m * (mbs * dp) + dp_rank * mbs + j` is row j of micro-batch m,
    so the global batch is the same set of samples at every data-parallel size."""
    mbs = cfg.train.micro_batch_size
    for m in range(count):
        start = first_sample + m * mbs * layout.dp + layout.dp_rank * mbs
        rows = torch.from_numpy(np.stack([dataset[start + j] for j in range(mbs)])).to(device)
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def train_step(engine, batches) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches with the model's own hook only
    (sigma-reparam's power step; no metrics, no spike guard); returns the DP-averaged loss.
    For tests and tools that drive an engine directly; the Trainer runs all its hooks."""
    from stable_megatron.hooks import PowerIteration, StepRunner

    return StepRunner(engine, [PowerIteration(engine.module)]).step(0, batches)


def evaluate(engine, dataset, cfg: Config, layout, device) -> float:
    accum = engine.gradient_accumulation_steps()
    losses = []
    for i in range(cfg.train.eval_iters):
        first = i * cfg.train.global_batch_size
        batches = micro_batches(dataset, first, cfg, layout, device, accum)
        losses.append(engine.eval_batch(batches).item())
    return sum(losses) / len(losses)


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
        from stable_megatron.hooks import StepRunner, Throughput, model_hooks
        from stable_megatron.metrics.logits import ZLossLog
        from stable_megatron.stability.divergence import DivergenceRule
        from stable_megatron.stability.guard import SpikeGuard
        from stable_megatron.stability.warning import EarlyWarning

        self.cfg = cfg
        # Data and checkpoint problems surface here, before any process group exists.
        self.sources = resolve_data(cfg)
        seq = cfg.model.seq_length
        self.train_ds = self.val_ds = None
        if self.sources.train_prefix is not None:
            self.train_ds = TokenWindowDataset(self.sources.train_prefix, seq,
                                               seed=cfg.train.seed)
        if self.sources.val_prefix and cfg.train.eval_interval:
            self.val_ds = TokenWindowDataset(self.sources.val_prefix, seq, seed=cfg.train.seed)
        start = self._find_checkpoint()
        self.state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.device)
        self.layout, self.device = self.state.layout, self.state.device
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
        self.warning = EarlyWarning(cfg.stability.warning)
        self.divergence = DivergenceRule(cfg.stability.divergence_patience)
        self.diverged: str | None = None  # why the run stopped, under stop_on_divergence
        self.accum = self.engine.gradient_accumulation_steps()
        self.metrics = None
        if cfg.metrics.interval:
            from stable_megatron.metrics import StabilityMetrics

            self.metrics = StabilityMetrics(cfg, self.state, self.engine)
        # before_step in this order, after_step in reverse: the timer times every hook, the
        # warning and divergence rules read the metrics, the guard's verdict and the loss
        self.hooks = StepRunner(self.engine, [
            Throughput(cfg, self.layout.world, self.device), self.warning, self.divergence,
            *model_hooks(cfg, self.engine.module), self.guard,
            *([ZLossLog(self.state, self.engine)] if cfg.model.z_loss > 0 else []),
            *([self.metrics] if self.metrics is not None else []),
        ])
        self.started_from = None
        if start is not None:
            self._restore(start[0], start[1], weights_only=start[2])
            self.started_from = start[0]
        self.start_step = self.step
        self.log = RunLogger(cfg, enabled=self.state.is_logging_rank, start_step=self.step)
        self.last_verdict, self.last_measured = None, False

    # ---------------------------------------------------------------- checkpoints

    def _find_checkpoint(self):
        """(tag_dir, meta, weights_only) to start from, or None. A rerun continues from this
        run's own latest checkpoint; `checkpoint.load` is used when there is none yet."""
        from stable_megatron import checkpoint as ckpt

        c = self.cfg.checkpoint
        tag_dir, weights_only = None, False
        if c.resume:
            tag_dir = ckpt.newest_complete(self.cfg.checkpoint_dir)
        if tag_dir is None and c.load:
            tag_dir, weights_only = ckpt.resolve(c.load, label="checkpoint.load"), c.finetune
        if tag_dir is None:
            return None
        meta = ckpt.read_meta(tag_dir)
        ckpt.verify(tag_dir, meta)
        ckpt.check_compatible(meta, self.cfg)
        return tag_dir, meta, weights_only

    def _check_layout(self, tag_dir, meta, weights_only) -> None:
        from stable_megatron import checkpoint as ckpt

        saved = ckpt.layout_of(meta)
        here = (self.layout.tp, self.layout.pp, self.layout.dp)
        if saved != here:  # loaded through DeepSpeed's universal checkpoint (reshape.py)
            from stable_megatron.checkpoint import reshape

            reshape.check_reshape(tag_dir, meta, self.cfg, self.layout, weights_only)

    def _restore(self, tag_dir, meta, weights_only: bool = False) -> None:
        from stable_megatron import checkpoint as ckpt
        from stable_megatron.checkpoint import reshape

        load = reshape.load if reshape.is_reshape(meta, self.layout) else ckpt.load
        client = load(self.engine, self.cfg, self.layout, tag_dir, meta, weights_only)
        if weights_only:
            return
        self.step, self.consumed = client["step"], client["consumed_samples"]
        self.rollbacks = client.get("rollbacks", 0)
        self.lr_scale = client.get("lr_scale", 1.0)
        self.hooks.load_state_dict(client)

    def client_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            **self.hooks.state_dict(),
        }

    def save(self) -> None:
        from stable_megatron import checkpoint as ckpt

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
        self._restore(target, meta)
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
        if engine.skipped_steps > skipped_before:
            record["update_skipped"] = 1
        self.hooks.after_step(step, record)
        self.last_verdict = self.guard.verdict
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
            record = self.train_one_step()
            if self.last_verdict.is_spike and self._on_spike(record):
                log.log(record)
                continue
            step = self.step
            evaluate_now = self.val_ds is not None and (
                step % cfg.train.eval_interval == 0 or step == cfg.train.steps
            )
            if evaluate_now:
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
