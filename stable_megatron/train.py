"""The training loop: config -> data -> model -> DeepSpeed engine -> steps -> logs/checkpoints.

Run with a launcher (`deepspeed --num_gpus N -m stable_megatron.train RECIPE k=v ...`,
`torchrun`) or as a single process (`python -m stable_megatron.train RECIPE`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stable_megatron.config import Config, ConfigError, dump_config, load_config, validate
from stable_megatron.data import DataError


@dataclass
class DataSources:
    train_prefix: str
    val_prefix: str | None
    tokenizer_model: str
    vocab_size: int


def resolve_data(cfg: Config) -> DataSources:
    """Prepare (built-in corpus, cached) or check (user data) the data; fills model.vocab_size."""
    from stable_megatron.data.dataset import prepare_builtin_data
    from stable_megatron.data.tokenizer import Tokenizer

    d = cfg.data
    if d.source == "builtin":
        paths = prepare_builtin_data(d.cache_dir, vocab_size=d.vocab_size)
        sources = DataSources(
            str(paths.train_prefix), str(paths.val_prefix), str(paths.tokenizer_model),
            paths.vocab_size,
        )
    else:
        vocab = Tokenizer(d.tokenizer_model).vocab_size
        sources = DataSources(d.train_prefix, d.val_prefix, d.tokenizer_model, vocab)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = sources.vocab_size
    elif cfg.model.vocab_size < sources.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({sources.vocab_size})"
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(cfg: Config, dp: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(cfg: Config, state):
    import deepspeed

    from stable_megatron.model.gpt import build_model

    model = build_model(cfg, state.topology, state.device).to(state.device)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        foreach=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(cfg, s) / t.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, state.layout.dp),
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
    """One optimizer step over this rank's micro-batches; returns the DP-averaged loss.
    sigma-reparam's power iteration runs once per step (on every rank, before the forwards),
    so its result does not depend on the number of micro-batches."""
    from stable_megatron.model.sigma_reparam import refresh_spectral_norms

    refresh_spectral_norms(engine.module)
    return engine.train_batch(batches)


def evaluate(engine, dataset, cfg: Config, layout, device) -> float:
    accum = engine.gradient_accumulation_steps()
    losses = []
    for i in range(cfg.train.eval_iters):
        first = i * cfg.train.global_batch_size
        batches = micro_batches(dataset, first, cfg, layout, device, accum)
        losses.append(engine.eval_batch(batches).item())
    return sum(losses) / len(losses)


def train(cfg: Config) -> dict:
    """Train per `cfg` (already validated); returns the last logged record. Starts the process
    groups if needed; the caller ends them (`parallel.shutdown`), so that one process can run
    several trainings."""
    from stable_megatron import parallel
    from stable_megatron.data.dataset import TokenWindowDataset, unigram_perplexity
    from stable_megatron.logger import RunLogger
    from stable_megatron.plan import throughput

    # Data problems surface here, before any process group exists.
    sources = resolve_data(cfg)
    seq = cfg.model.seq_length
    train_ds = TokenWindowDataset(sources.train_prefix, seq, seed=cfg.train.seed)
    val_ds = None
    if sources.val_prefix and cfg.train.eval_interval:
        val_ds = TokenWindowDataset(sources.val_prefix, seq, seed=cfg.train.seed)
    state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.device)
    layout, device = state.layout, state.device
    engine = build_engine(cfg, state)
    step, consumed = 0, 0
    ckpt_dir = cfg.checkpoint_dir
    load_dir = cfg.checkpoint.load or (
        ckpt_dir if cfg.checkpoint.resume and (ckpt_dir / "latest").is_file() else None
    )
    if load_dir is not None:
        _, client = engine.load_checkpoint(str(load_dir))
        if client is None:
            raise RuntimeError(f"checkpoint.load={load_dir}: no loadable checkpoint there")
        step, consumed = client["step"], client["consumed_samples"]
    start_step = step
    log = RunLogger(cfg, enabled=state.is_logging_rank, start_step=step)
    if state.is_logging_rank:
        Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
    log.info(
        f"stable_megatron: world {layout.world} = tp {layout.tp} x pp {layout.pp} x "
        f"dp {layout.dp} on {device}; run dir {cfg.train.run_dir}"
        + (f"; resumed at step {step}" if step else "")
    )
    if val_ds is not None and state.is_logging_rank:
        baseline = unigram_perplexity(sources.train_prefix, sources.val_prefix,
                                      sources.vocab_size)
        log.info(f"validation baseline: unigram perplexity {baseline:.1f}")
    accum = engine.gradient_accumulation_steps()
    stability = None
    if cfg.metrics.interval:
        from stable_megatron.metrics import StabilityMetrics

        stability = StabilityMetrics(cfg, state, engine)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gb, tokens_per_step = cfg.train.global_batch_size, cfg.train.global_batch_size * seq
    last = {}
    while step < cfg.train.steps:
        lr = engine.get_lr()[0]
        measure = stability is not None and stability.due(step + 1)
        started = time.time()
        if measure:
            stability.start_step()
        loss = train_step(engine, micro_batches(train_ds, consumed, cfg, layout, device, accum))
        stats = stability.finish_step() if measure else {}
        elapsed = time.time() - started
        step += 1
        consumed += gb
        record = {
            "step": step,
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm()),
            "tokens_per_sec": tokens_per_step / elapsed,
            **throughput(cfg, tokens_per_step / elapsed, layout.world, device_name),
            "consumed_tokens": consumed * seq,
            "step_time": elapsed,
            **stats,
        }
        evaluate_now = val_ds is not None and (
            step % cfg.train.eval_interval == 0 or step == cfg.train.steps
        )
        if evaluate_now:
            val_loss = evaluate(engine, val_ds, cfg, layout, device)
            record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        if evaluate_now or measure or step % cfg.train.log_interval == 0 or \
                step == cfg.train.steps:
            log.log(record)
        last = record
        interval = cfg.checkpoint.interval
        exiting = cfg.train.exit_interval and step - start_step >= cfg.train.exit_interval
        if (interval and step % interval == 0) or step == cfg.train.steps or exiting:
            engine.save_checkpoint(
                str(ckpt_dir),
                tag=f"step{step:08d}",
                client_state={"step": step, "consumed_samples": consumed},
            )
        if exiting:
            log.info(f"exit_interval reached: stopping at step {step}; run again to resume")
            break
    log.info(f"done: {step} steps; logs in {cfg.train.run_dir}/metrics.jsonl"
             f" (TensorBoard: tensorboard --logdir {cfg.train.run_dir})")
    log.close()
    return last


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

    try:
        cfg = load_config(recipe, overrides)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        train(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
