"""Run configuration: nested dataclasses loaded from a YAML recipe plus dotted overrides.

Every user error (unknown key, wrong type, invalid combination) raises `ConfigError` with a
single line naming the field and what would be valid. Validation happens before any process
group is created so that a bad recipe costs nothing on a cluster.

The stability methods' keys of the `model` section, and their rules, are each method's own
(stable_megatron/methods/); this module keeps the loader, the sections and the rules that span
them, the rules between two methods included (model.sigma_reparam with model.mlra; model.qk_clip
with model.norm_placement or sigma-reparam on qkv).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RecomputeMode = Literal["none", "selective", "full"]
RECOMPUTE_MODES = typing.get_args(RecomputeMode)


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the field."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    seq_length: int = 128
    vocab_size: int | None = None  # embedding rows before padding; default data.vocab_size
    vocab_pad_multiple: int = 128  # padded vocab is a multiple of this (and of parallel.tp)
    position_embedding: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    # Llama-style blocks: RMSNorm for every norm of the model, and a SwiGLU MLP
    # (silu(x W_gate) * (x W_up), megatron-core's gated_linear_unit; ffn_hidden_size is the
    # width of each of the two)
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    activation: Literal["gelu", "swiglu"] = "gelu"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    add_bias_linear: bool = True
    # auto: SDPA without a softmax cap; with one, FlexAttention on GPU, the math path on CPU
    attention_backend: Literal["auto", "sdpa", "flex", "math"] = "auto"
    # The stability methods' keys (model.norm_placement, model.sigma_reparam, ...) are not
    # listed here: each method module of stable_megatron/methods/ declares its own, and they
    # are set on every ModelConfig from the registry (the defaults: the plain pre-LN GPT).

    def __post_init__(self) -> None:
        from stable_megatron import methods

        for f in methods.model_fields():
            if f.name not in self.__dict__:
                setattr(self, f.name, f.make_default())

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """vocab_size rounded up to a multiple of vocab_pad_multiple that tp divides. Padded
        logits take part in the softmax, so the padded size is part of the model: with the
        least common multiple it is the same at every tp that divides vocab_pad_multiple
        (any power of two up to 128 by default), and checkpoints reshape exactly."""
        assert self.vocab_size is not None, "vocab_size is resolved from the tokenizer first"
        multiple = math.lcm(self.vocab_pad_multiple, tp)
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    partition_method: str = "type:TransformerLayerPipe"
    # how long a collective waits for the other ranks before it fails (torch.distributed)
    timeout_minutes: float = 30.0
    # the step watchdog (stable_megatron/watchdog.py): a step may take watchdog_factor times the
    # slowest of the run's recent steps, and at least watchdog_floor_s, which also bounds
    # start-up, saves, evaluations and rollbacks; past that, every rank dumps its Python stacks
    # into <run_dir>/stacks/ and the job exits with code 4
    watchdog: bool = True
    watchdog_factor: float = 10.0
    watchdog_floor_s: float = 900.0


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    # false: no weight decay on the embeddings (word and position; the tied output layer with
    # them), as OLMo 2
    embedding_weight_decay: bool = True
    # the LR of the linear layers' weight matrices (every matrix but the embedding tables) as a
    # multiple of the schedule's; 1 keeps one schedule for all (an experiment's knob: the
    # effective-LR control of sigma-reparam in docs/results.md)
    linear_lr_scale: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 1234
    run_dir: str = "runs/default"
    log_interval: int = 1
    eval_interval: int = 50  # 0 disables validation
    eval_iters: int = 10
    exit_interval: int = 0  # stop (with a checkpoint) after this many steps of this run; 0: off
    # activation recompute (model/recompute.py): none; selective (the attention kernel, where
    # it materialises the probabilities); full (every transformer layer, only its input kept)
    recompute: RecomputeMode = "none"


@dataclass
class DataConfig:
    source: Literal["builtin", "indexed", "blended"] = "builtin"
    cache_dir: str = ".cache/stable_megatron"
    # the tokenizer's vocabulary: the size the built-in corpus's tokenizer is trained to;
    # for source=indexed, read from tokenizer_model by validation
    vocab_size: int = 8192
    train_prefix: str | None = None  # indexed dataset prefix (.bin/.idx) for source=indexed
    val_prefix: str | None = None
    tokenizer_model: str | None = None  # sentencepiece model for source=indexed or blended
    # source=blended (megatron-core's GPTDataset + BlendedDataset; data/blend.py): Megatron's
    # blend list, [w1, prefix1, w2, prefix2, ...] or [prefix1, prefix2, ...] (by size); the
    # validation data: a "train,valid,test" split of every corpus, or separate corpora
    blend: list[str] | None = None
    split: str = "99,1,0"
    val_blend: list[str] | None = None


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0: only at the end of the run
    dir: str | None = None  # default: <run_dir>/checkpoints
    # a checkpoint directory (with `latest`) or one checkpoint (a step directory) to start
    # from; default: resume from `dir` if it holds a complete checkpoint
    load: str | None = None
    resume: bool = True
    keep: int = 3  # complete checkpoints kept in `dir` (older ones are deleted); 0: keep all
    finetune: bool = False  # with `load`: weights only (fresh optimizer, step 0, data start)
    # a finished checkpoint of `dir` that fails verification (a file missing, truncated or with
    # another checksum) is reported, marked and then: fallback: resume from the newest verified
    # one (a relaunch makes progress); stop: exit with the error (checkpoint/format.py)
    on_corrupt: Literal["fallback", "stop"] = "fallback"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "stable_megatron"
    progress: bool = True


@dataclass
class MetricsConfig:
    """Stability metrics (docs/stability.md, "Stability metrics"), every `interval` steps."""

    interval: int = 10  # 0: off
    attention: bool = True  # entropy and max logit (an extra no-grad attention pass)
    output_norms: bool = True  # mean token L2 norm of the QKV, Proj, FC1, FC2 outputs
    grad_norms: bool = True  # per-layer and global gradient norms
    # update_ratio/... (||delta W|| / ||W|| per group) and update_rms/... (RMS of delta W / lr):
    # a copy of the weights on metric steps
    updates: bool = True
    # sigma-reparam: also log `sigma_exact/...`, the spectral norm from this many extra power
    # steps on copies of each layer's vectors (a converged reference for the one-step estimate
    # `sigma/...`), and `sigma_lag/...` = 1 - sigma / sigma_exact; 0: off
    sigma_exact_iters: int = 0


@dataclass
class WarningConfig:
    """Early-warning rule on the stability metrics (docs/stability.md): reported before the
    loss diverges. Each rule compares the newest metric record with those of the trailing
    `window` steps (stable_megatron/stability/warning.py) and fires once per episode.

    The defaults marked (seed 1) were chosen by `analysis.warning_score.choose_config` on the
    70 runs of seed 1 of recipes/repro/seeds.yaml and scored on seeds 2 and 3 (docs/results.md,
    "Early warning, scored"); the previous ones are `warning_score.PREVIOUS_DEFAULTS`."""

    enabled: bool = True
    window: int = 50  # steps each trend is measured over (and quiet steps that re-arm a rule)
    # no rule fires before this step (a warm-up grace period; non-finite values still fire)
    grace_steps: int = 0
    # a rule fires once its condition has held on this many metric records in a row
    persist: int = 1
    # metric records needed before a rule is scored; when fewer than this fall in the window
    # (metrics.interval > window / min_records) the trend spans the last min_records records
    min_records: int = 1  # (seed 1; was 3: one earlier record lets a rule fire 20 steps sooner)
    # logit_growth: a layer's max attention logit (before capping) >= logit_floor and
    # >= logit_growth x its minimum over the window; logit_growth=0 turns the rule off
    logit_growth: float = 2.0
    logit_floor: float = 50.0  # the softmax cap of Rybakov et al.; healthy tiny runs stay < 40
    # entropy_collapse: a layer's lowest normalised head entropy (1 = uniform) < entropy_floor
    # and < entropy_drop x its maximum over the window; entropy_floor=0 turns the rule off
    entropy_floor: float = 0.2
    entropy_drop: float = 0.5
    # tev_growth: tev/mean (and tev_out/mean) >= tev_growth x its minimum over the window;
    # 0 turns the rule off
    tev_growth: float = 0.0  # (seed 1; was 2: TEV doubles early in healthy runs too)
    # output_logit_drift: |output_logit/mean| >= output_logit_floor and >= output_logit_growth x
    # its smallest |value| over the window (output-logit divergence, Wortsman et al. 2023);
    # output_logit_growth=0 turns the rule off
    output_logit_growth: float = 2.0
    output_logit_floor: float = 20.0
    # update_spike: a group's update_rms (RMS of delta W / lr) >= update_growth x its median over
    # the window (update-norm spikes came before loss spikes in large runs); 0 turns it off
    update_growth: float = 5.0  # (seed 1; was 3)


@dataclass
class StabilityConfig:
    """Loss / grad-norm spike detection and what to do about a spike (docs/stability.md)."""

    # log: record the event; skip: drop that step's optimizer update on every rank;
    # rollback: reload the last checkpoint and skip the batches since it; replay: drop the
    # update, recompute the step from the same state on the same batch and compare: the same
    # loss and grad norm (the data): skip the batch; different (a transient fault): apply the
    # recomputed step and go on
    on_spike: Literal["log", "skip", "rollback", "replay"] = "log"
    # replay: loss and grad norm agree when within this relative difference (0: bit-exact, as
    # on CPU; GPU kernels that are not deterministic need a little more)
    replay_rtol: float = 0.0
    window: int = 50  # steps in the running mean / std of loss and grad norm
    min_history: int = 10  # steps of history before spikes are scored
    loss_k: float = 6.0  # a loss above mean + loss_k * std is a spike
    grad_norm_k: float = 0.0  # same for the grad norm; 0: only non-finite grad norms count
    max_rollbacks: int = 3  # give up (exit with an error) after this many rollbacks
    # stop (exit 3) when more than this fraction of the last `window` steps dropped their update
    # (overflow, spike or non-finite; stability/skips.py); 1: never
    max_skipped_fraction: float = 0.25
    rollback_lr_factor: float = 1.0  # multiply the LR by this after each rollback
    warning: WarningConfig = field(default_factory=WarningConfig)
    # Stop the run (exit 0, `{"event": "diverged"}` in metrics.jsonl) when the loss is not
    # finite, or has stayed above the run's first-step loss for `divergence_patience` steps in a
    # row (stable_megatron/stability/divergence.py). The LR sweep turns it on.
    stop_on_divergence: bool = False
    divergence_patience: int = 10


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.run_dir) / "checkpoints")

    @property
    def tokenizer_vocab_size(self) -> int:
        """The ids a token can take (`data.vocab_size`, resolved by `validate`); the model's
        embedding may have more rows (`model.vocab_size`, then padding)."""
        return self.data.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


def base_model_keys() -> tuple[str, ...]:
    """The `model.*` keys of ModelConfig itself (the methods' keys are added to these)."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def _method_keys(cls: type) -> dict[str, Any]:
    """The keys the registered methods add to section `cls` (only to ModelConfig): name -> type."""
    if cls is not ModelConfig:
        return {}
    from stable_megatron import methods

    return {f.name: f.type for f in methods.model_fields()}


def as_dict(obj: Any) -> Any:
    """A config or a section as plain data (as `dataclasses.asdict`, with the methods' keys of
    the model section, after ModelConfig's own)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)] + list(_method_keys(type(obj)))
        return {name: as_dict(getattr(obj, name)) for name in names}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(tp)
            return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    extra = _method_keys(cls)
    hints.update(extra)
    fields = [f.name for f in dataclasses.fields(cls)] + list(extra)
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys under {prefix or 'the top level'}: "
            f"{', '.join(fields)}"
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, name)
        else:
            kwargs[key] = _coerce(name, value, tp)
    obj = cls(**{k: v for k, v in kwargs.items() if k not in extra})
    for key in extra.keys() & kwargs.keys():  # the methods' keys: set after the defaults
        setattr(obj, key, kwargs[key])
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's sections; `base: other.yaml` (relative to the recipe) is read first and
    the recipe's own keys override it, so method recipes state only what they change."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"recipe {path}: base recipes form a cycle ({chain})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a path to a recipe, got {base!r}")
    return _merge(read_recipe(path.parent / base, (*_seen, path.resolve())), data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") \
            from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"recipe {path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"recipe {path}: expected a mapping of sections, got {kind}")
    return data


def load_config(
    recipe: str | os.PathLike | None, overrides: list[str] | None = None
) -> Config:
    """Recipe YAML + `a.b=c` overrides -> Config (types checked, not yet validated)."""
    data = read_recipe(recipe) if recipe is not None else {}
    # Recipe metadata, not run settings: per-world-size layouts read by `plan` (plan.py) and
    # the default methods / learning rates of `stable-megatron sweep` (sweep.py).
    data.pop("layouts", None)
    data.pop("sweep", None)
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


# --------------------------------------------------------------------------------------------
# Validation


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
    if p.zero_stage != 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage}: the pipeline engine supports ZeRO stage 1 only"
        )
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}")
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


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
