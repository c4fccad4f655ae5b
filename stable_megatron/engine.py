"""The optimizer and the engine: AdamW's parameter groups, the LR schedule, DeepSpeed's config
and its pipeline engine, and one bare optimizer step for tests and tools. The loop that drives
the engine is `stable_megatron.train`."""

from __future__ import annotations

import math

import torch

from stable_megatron.config import Config


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

    from stable_megatron import ds_adapter

    tables = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, VocabParallelEmbedding)):
            tables.update(id(p) for p in module.parameters())
    decay, no_decay, linear = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        table = id(param) in tables
        if len(ds_adapter.full_shape(param)) < 2 or (table and not decay_embeddings):
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


def make_muon(model: torch.nn.Module, cfg: Config):
    """`train.optimizer=muon`: Muon on the transformer layers' matrices, with
    `train.muon_lr` / `muon_weight_decay` (default: lr / weight_decay), and on every other
    parameter the AdamW groups of `make_optimizer` (stable_megatron/muon.py)."""
    from stable_megatron import parallel
    from stable_megatron.muon import MuonAdamW, muon_groups

    t = cfg.train
    muon_lr = t.muon_lr if t.muon_lr is not None else t.lr
    muon_wd = t.muon_weight_decay if t.muon_weight_decay is not None else t.weight_decay
    groups, matrices, decay = muon_groups(
        model, param_groups(model, t.weight_decay, t.embedding_weight_decay), muon_lr, muon_wd
    )
    return MuonAdamW(groups, matrices, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                     eps=t.adam_eps, momentum=t.muon_momentum, nesterov=t.muon_nesterov,
                     ns_steps=t.muon_ns_steps, tp_group=parallel.tp_group(), decay=decay)


# DeepSpeed's default for ZeRO's gradient bucket, in elements
DS_REDUCE_BUCKET = 500_000_000


def deepspeed_config(cfg: Config, dp: int, stage_params: int = DS_REDUCE_BUCKET,
                     largest_param: int | None = None) -> dict:
    """The engine's config. `stage_params`, the number of parameters on this rank, caps ZeRO's
    gradient bucket: with pipeline parallelism DeepSpeed allocates a fresh bucket of
    `reduce_bucket_size` elements every step (2 GB of fp32 at its default of 5e8, for a model
    of a few million parameters here), and the part the gradients fill is faulted in anew each
    step on CPU and held by the caching allocator on GPU. A bucket as large as the stage's
    parameters groups the reduction exactly as the default does for any stage under 5e8.
    Under ZeRO-3, whose point is to hold 1/dp of the model state, the bucket is one parameter
    (`largest_param`, the largest on this rank): a bucket of the whole model would be the
    largest buffer of the rank."""
    t, stage = cfg.train, cfg.parallel.zero_stage
    bucket = largest_param if stage == 3 and largest_param else stage_params
    zero = {"stage": stage, "reduce_bucket_size": max(1, min(bucket, DS_REDUCE_BUCKET))}
    if stage == 3:
        # every parameter partitioned: DeepSpeed's default (1e5) keeps those under 100k
        # elements whole on every rank, which at this project's CPU scale is all of them
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        # stage 0 clips in ds_adapter.StageZeroOptimizer, which also keeps the global norm
        "gradient_clipping": t.grad_clip if stage > 0 else 0.0,
        "zero_optimization": zero,
        # check_grad_overflow: drop (not apply) a bf16 step with inf/NaN gradients, as fp32 does
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        # ZeRO wraps any optimizer it knows; ours (Muon, stable_megatron/muon.py) it must be
        # told to accept: it steps the flat partitions as AdamW does, plus the gathers
        "zero_allow_untested_optimizer": t.optimizer == "muon",
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(cfg: Config, state, lr_scale=None):
    """The DeepSpeed engine (`ds_adapter.initialize`: the pipeline engine at pp > 1, DeepSpeed's
    plain engine at pp=1, where ZeRO stages 0-3 are open); `lr_scale()` (default 1) multiplies
    the LR schedule (rollbacks lower it)."""
    from stable_megatron import ds_adapter, parallel
    from stable_megatron.model.gpt import build_model

    t = cfg.train
    zero_init = cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init
    with ds_adapter.partitioned_build(zero_init):  # ZeRO-3: no rank holds the whole model
        model = build_model(cfg, state.topology, state.device).to(state.device)
    if zero_init and t.precision == "bf16":  # as DeepSpeed casts a model it partitions itself
        ds_adapter.cast_partitions(model, torch.bfloat16)
    optimizer = make_muon(model, cfg) if t.optimizer == "muon" else make_optimizer(model, cfg)
    if cfg.parallel.zero_stage == 0:  # the decision point and global norm ZeRO would give
        optimizer = ds_adapter.stage_zero_optimizer(optimizer, t.grad_clip, parallel.tp_group())
    scale = lr_scale or (lambda: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(cfg, s) / t.lr * scale()
    )
    sizes = [ds_adapter.full_numel(p) for p in model.parameters()]
    engine = ds_adapter.initialize(
        model, optimizer, scheduler,
        deepspeed_config(cfg, state.layout.dp, sum(sizes), max(sizes, default=1)),
    )
    if t.optimizer == "muon" and cfg.parallel.zero_stage in (1, 2):
        # where each matrix lies in ZeRO's flat partitions (stage 0: the parameters themselves)
        ds_adapter.base_optimizer(engine).attach_flat_layouts(ds_adapter.zero_flat_layouts(engine))
    return engine


def train_step(engine, batches, cfg: Config) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches with the model's own hooks only (its
    methods' `model_hooks`; no metrics, no spike guard); returns the DP-averaged loss. For
    tests and tools that drive an engine directly; the Trainer runs all its hooks."""
    from stable_megatron.hooks import StepRunner, model_hooks

    return StepRunner(engine, model_hooks(cfg, engine.module)).step(0, batches)
