"""The run configuration's schema: one dataclass per recipe section (`model`, `parallel`,
`train`, `data`, `checkpoint`, `logging`, `metrics`, `stability`) and `Config`, their whole.

The stability methods' keys of the `model` section are not declared here: each method module
of stable_megatron/methods/ declares its own, and ModelConfig takes them from the registry.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the field."""


RecomputeMode = Literal["none", "selective", "full"]
RECOMPUTE_MODES = typing.get_args(RecomputeMode)


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
    # The stability methods' keys are not listed here: each method module of
    # stable_megatron/methods/ declares its own, and they are set on every ModelConfig from
    # the registry (the defaults: the plain pre-LN GPT).

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
    # under ZeRO-3: build the model inside DeepSpeed's zero.Init, each block's weights split
    # over the data-parallel ranks as soon as the block is built, so that no rank ever holds
    # the whole model (false: built whole on every rank, split when the engine starts)
    zero_init: bool = True
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
    # muon: Muon on the transformer layers' matrices, AdamW (the keys above) on the rest
    # (stable_megatron/muon.py); the Muon group's LR and weight decay default to lr and
    # weight_decay and follow the same schedule
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float | None = None
    muon_weight_decay: float | None = None
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
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


def method_keys(cls: type) -> dict[str, Any]:
    """The keys the registered methods add to section `cls` (only to ModelConfig): name -> type."""
    if cls is not ModelConfig:
        return {}
    from stable_megatron import methods

    return {f.name: f.type for f in methods.model_fields()}


def as_dict(obj: Any) -> Any:
    """A config or a section as plain data (as `dataclasses.asdict`, with the methods' keys of
    the model section, after ModelConfig's own)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)] + list(method_keys(type(obj)))
        return {name: as_dict(getattr(obj, name)) for name in names}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
