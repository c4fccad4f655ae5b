"""Whether a loaded configuration can run: every rule that spans sections (layout against model
shape and world size, batch sizes, schedules, stability and checkpoint settings, data files),
then each registered method's own rules (stable_megatron/methods/) and the rules between two
methods (model.sigma_reparam with model.mlra: sigma-reparam cannot target the slots MLRA
replaces; model.qk_clip with model.norm_placement or with sigma-reparam on qkv: neither lets
scaling q and k bound the logits). Validation happens before any process group is created, so
that a bad recipe costs nothing on a cluster; each error is one `ConfigError` line naming the
key and what would be valid.
"""

from __future__ import annotations

from pathlib import Path

from stable_megatron.config.sections import (
    RECOMPUTE_MODES,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
)


def validate(cfg: Config, world_size: int) -> None:
    """Raise ConfigError for any setting that cannot run at `world_size` processes."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data

    def positive(name: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{name}={value}: must be > 0")

    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        positive(f"model.{name}", getattr(m, name))
    for name in ("tp", "pp"):
        positive(f"parallel.{name}", getattr(p, name))
    for name in ("steps", "micro_batch_size", "global_batch_size", "lr", "log_interval"):
        positive(f"train.{name}", getattr(t, name))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tp={p.tp}; valid tp: {_divisors(m.num_attention_heads)}"
        )
    if m.ffn_size % p.tp:
        raise ConfigError(
            f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tp={p.tp}"
        )
    if m.position_embedding == "rope" and m.head_dim % 2:
        raise ConfigError(
            f"model.position_embedding=rope needs an even head dim, got {m.head_dim}"
        )
    if m.num_layers % p.pp:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}; "
            f"valid pp: {_divisors(m.num_layers)}"
        )
    if world_size % (p.tp * p.pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
            f"{p.tp * p.pp}"
        )
    dp = world_size // (p.tp * p.pp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size * data-parallel size = "
            f"{t.micro_batch_size} * {dp} = {per_step}"
        )
    if not p.timeout_minutes > 0:
        raise ConfigError(f"parallel.timeout_minutes={p.timeout_minutes}: must be > 0")
    if not (p.watchdog_factor > 1 and p.watchdog_floor_s > 0):
        raise ConfigError(
            f"parallel.watchdog_factor={p.watchdog_factor} must be > 1 and "
            f"parallel.watchdog_floor_s={p.watchdog_floor_s} > 0"
        )
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: valid values: 0, 1, 2, 3")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline "
            f"engine supports ZeRO stages 0 and 1 only; use parallel.pp=1 for stage 2 or 3"
        )
    if p.zero_stage == 0 and t.precision == "bf16":
        raise ConfigError(
            "parallel.zero_stage=0 with train.precision=bf16: DeepSpeed's bf16 optimizer keeps "
            "its fp32 master weights partitioned as ZeRO-1 does; use parallel.zero_stage=1"
        )
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}")
    _validate_muon(cfg)
    if not t.linear_lr_scale > 0:
        raise ConfigError(f"train.linear_lr_scale={t.linear_lr_scale}: must be > 0")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    if t.recompute not in RECOMPUTE_MODES:
        raise ConfigError(
            f"train.recompute={t.recompute!r}: valid values: {', '.join(RECOMPUTE_MODES)}"
        )
    if t.eval_interval < 0:
        raise ConfigError(f"train.eval_interval={t.eval_interval}: must be >= 0 (0 disables)")
    if t.eval_interval and t.eval_iters <= 0:
        raise ConfigError(
            f"train.eval_iters={t.eval_iters}: must be > 0 when train.eval_interval > 0"
        )
    if cfg.metrics.interval < 0:
        raise ConfigError(f"metrics.interval={cfg.metrics.interval}: must be >= 0 (0 disables)")
    if cfg.metrics.sigma_exact_iters < 0:
        raise ConfigError(
            f"metrics.sigma_exact_iters={cfg.metrics.sigma_exact_iters}: must be >= 0 (0: off)"
        )
    _validate_stability(cfg)
    if d.source == "indexed":
        for name in ("train_prefix", "tokenizer_model"):
            if getattr(d, name) is None:
                raise ConfigError(f"data.{name} is required when data.source=indexed")
        _check_prefix("data.train_prefix", d.train_prefix)
        if d.val_prefix is not None:
            _check_prefix("data.val_prefix", d.val_prefix)
        if not Path(d.tokenizer_model).is_file():
            raise ConfigError(f"data.tokenizer_model={d.tokenizer_model}: no such file")
    if d.source == "blended":
        _validate_blend(d)
    _validate_methods(cfg, world_size)
    if m.vocab_size is not None:
        positive("model.vocab_size", m.vocab_size)
    positive("model.vocab_pad_multiple", m.vocab_pad_multiple)
    resolve_vocab(cfg)


def resolve_vocab(cfg: Config) -> None:
    """Fill the derived vocabulary fields, so that a validated config is final:
    `data.vocab_size` is the tokenizer's vocabulary (the built-in corpus's tokenizer is trained
    to exactly that size; an indexed dataset's is read from `data.tokenizer_model`), and
    `model.vocab_size` (the embedding rows before padding) defaults to it and may not be
    smaller. Idempotent."""
    d, m = cfg.data, cfg.model
    if d.source in ("indexed", "blended"):
        import sentencepiece as spm

        try:
            processor = spm.SentencePieceProcessor(model_file=str(d.tokenizer_model))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(
                f"data.tokenizer_model={d.tokenizer_model}: not a sentencepiece model ({exc})"
            ) from None
        d.vocab_size = int(processor.get_piece_size())
    if d.vocab_size <= 0:
        raise ConfigError(f"data.vocab_size={d.vocab_size}: must be > 0")
    if m.vocab_size is None:
        m.vocab_size = d.vocab_size
    elif m.vocab_size < d.vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({d.vocab_size}, data.vocab_size)"
        )


def _validate_muon(cfg: Config) -> None:
    t = cfg.train
    if t.optimizer != "muon":
        return
    if t.muon_lr is not None and not t.muon_lr > 0:
        raise ConfigError(f"train.muon_lr={t.muon_lr}: must be > 0 (unset: train.lr)")
    if t.muon_weight_decay is not None and t.muon_weight_decay < 0:
        raise ConfigError(f"train.muon_weight_decay={t.muon_weight_decay}: must be >= 0")
    if not 0 <= t.muon_momentum < 1:
        raise ConfigError(f"train.muon_momentum={t.muon_momentum}: must be in [0, 1)")
    if t.muon_ns_steps < 1:
        raise ConfigError(f"train.muon_ns_steps={t.muon_ns_steps}: must be >= 1")
    if t.linear_lr_scale != 1.0:
        raise ConfigError(
            f"train.linear_lr_scale={t.linear_lr_scale} with train.optimizer=muon: the linear "
            f"layers' matrices take Muon, whose LR is train.muon_lr; leave linear_lr_scale at 1"
        )
    if cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "train.optimizer=muon with parallel.zero_stage=3: Muon orthogonalises whole "
            "matrices, which ZeRO-3 keeps split over the data-parallel ranks (not supported); "
            "use parallel.zero_stage 0, 1 or 2"
        )


def _validate_stability(cfg: Config) -> None:
    s, c = cfg.stability, cfg.checkpoint
    if s.window < 2:
        raise ConfigError(f"stability.window={s.window}: must be >= 2")
    if not 2 <= s.min_history <= s.window:
        raise ConfigError(
            f"stability.min_history={s.min_history}: must be between 2 and "
            f"stability.window={s.window}"
        )
    if s.loss_k <= 0 or s.grad_norm_k < 0:
        raise ConfigError("stability.loss_k must be > 0 and stability.grad_norm_k >= 0")
    if not 0 < s.max_skipped_fraction <= 1:
        raise ConfigError(
            f"stability.max_skipped_fraction={s.max_skipped_fraction}: must be in (0, 1] (1: off)"
        )
    if not s.replay_rtol >= 0:
        raise ConfigError(f"stability.replay_rtol={s.replay_rtol}: must be >= 0")
    if s.max_rollbacks < 0:
        raise ConfigError(f"stability.max_rollbacks={s.max_rollbacks}: must be >= 0")
    if not 0 < s.rollback_lr_factor <= 1:
        raise ConfigError(
            f"stability.rollback_lr_factor={s.rollback_lr_factor}: must be in (0, 1]"
        )
    if s.on_spike == "rollback" and c.interval <= 0:
        raise ConfigError(
            "stability.on_spike=rollback needs checkpoints to roll back to: set "
            "checkpoint.interval > 0"
        )
    if s.divergence_patience < 1:
        raise ConfigError(
            f"stability.divergence_patience={s.divergence_patience}: must be >= 1"
        )
    if c.keep < 0:
        raise ConfigError(f"checkpoint.keep={c.keep}: must be >= 0 (0 keeps all)")
    if c.finetune and not c.load:
        raise ConfigError("checkpoint.finetune=true needs checkpoint.load=PATH (the weights)")
    _validate_warning(cfg)


def _validate_warning(cfg: Config) -> None:
    w = cfg.stability.warning
    name = "stability.warning"
    if w.window < 1 or w.min_records < 1:
        raise ConfigError(f"{name}.window and {name}.min_records must be >= 1")
    if w.grace_steps < 0:
        raise ConfigError(f"{name}.grace_steps={w.grace_steps}: must be >= 0")
    if w.persist < 1:
        raise ConfigError(f"{name}.persist={w.persist}: must be >= 1 (1 fires at once)")
    for key in ("logit_growth", "tev_growth", "output_logit_growth", "update_growth"):
        value = getattr(w, key)
        if value != 0 and not value > 1:
            raise ConfigError(f"{name}.{key}={value}: must be > 1 (a growth factor) or 0 (off)")
    for key in ("logit_floor", "output_logit_floor"):
        if not getattr(w, key) >= 0:
            raise ConfigError(f"{name}.{key}={getattr(w, key)}: must be >= 0")
    if not 0 <= w.entropy_floor < 1:
        raise ConfigError(f"{name}.entropy_floor={w.entropy_floor}: must be in [0, 1) (0: off)")
    if not 0 < w.entropy_drop <= 1:
        raise ConfigError(f"{name}.entropy_drop={w.entropy_drop}: must be in (0, 1]")


def _validate_methods(cfg: Config, world_size: int) -> None:
    """The model keys no method owns, then every registered method's own rules (each checks
    its keys whether or not it is switched on)."""
    from stable_megatron import methods

    m = cfg.model
    if m.attention_dropout != 0:
        raise ConfigError(
            f"model.attention_dropout={m.attention_dropout}: must be 0 (no attention kernel "
            f"applies dropout; see model/attention.py)"
        )
    for method in methods.methods():
        method.validate(cfg, world_size)
    _validate_combinations(m)


def _validate_combinations(m: ModelConfig) -> None:
    """The rules between two built-in methods (each method's own rules are in its module)."""
    sr = m.sigma_reparam
    if sr.enabled and m.attention == "mlra":
        replaced = {"qkv": bool(set(m.mlra.targets) & {"q", "k", "v"}),
                    "proj": "o" in m.mlra.targets}
        clash = [t for t in sr.targets if replaced.get(t)]
        if clash:
            raise ConfigError(
                f"model.sigma_reparam.targets has {', '.join(clash)}, which model.attention=mlra "
                f"replaces with low-rank factors; remove it from the targets"
            )
    if not m.qk_clip.enabled:
        return
    if m.norm_placement != "pre_ln":
        raise ConfigError(
            f"model.qk_clip with model.norm_placement={m.norm_placement}: the head norms "
            f"normalise q and k, so scaling the weights before them cannot bound the logits "
            f"(the norm already does); use one of the two"
        )
    if sr.enabled and "qkv" in sr.targets:
        raise ConfigError(
            "model.qk_clip with sigma-reparam on qkv: the layer's weight is gamma W / sigma(W), "
            "which scaling rows of W does not scale per head; remove qkv from "
            "model.sigma_reparam.targets or switch one of them off"
        )


def _validate_blend(d: DataConfig) -> None:
    from stable_megatron.data.blend import missing_files, parse_blend, parse_split

    if d.tokenizer_model is None:
        raise ConfigError("data.tokenizer_model is required when data.source=blended")
    if not Path(d.tokenizer_model).is_file():
        raise ConfigError(f"data.tokenizer_model={d.tokenizer_model}: no such file")
    if d.blend is None:
        raise ConfigError("data.blend is required when data.source=blended: "
                          "[weight, prefix, weight, prefix, ...] or [prefix, ...]")
    for name, items in (("data.blend", d.blend), ("data.val_blend", d.val_blend)):
        if items is None:
            continue
        try:
            blend = parse_blend(name, items)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        missing = missing_files(blend.prefixes)
        if missing:
            raise ConfigError(f"{name}: missing {missing[0]}")
    if d.val_blend is None:
        try:
            parse_split(d.split)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_prefix(name: str, prefix: str | None) -> None:
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise ConfigError(f"{name}={prefix}: missing {prefix}{suffix}")


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
