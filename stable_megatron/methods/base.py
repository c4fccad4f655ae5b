"""What a stability method is to the rest of the package: the `Method` a method module defines
and registers (`stable_megatron.methods.register`), the `Field`s of the model config it owns,
and the `LayerSlots` its layer-spec change edits.

Every part is optional; the base class does nothing. A method module imports no torch at its
top level (the config loader reads the registry), and reaches the model code inside the
functions that build things."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Field:
    """One key of the `model` config section, owned by a method: `model.<name>`, of `type` (a
    dataclass for a subsection, else a type the loader checks: bool, int, float, str, Literal,
    `X | None`, list[...]), with `default` (a value, or a zero-argument factory for mutable
    defaults and dataclasses)."""

    name: str
    type: Any
    default: Any = None
    factory: Callable[[], Any] | None = None

    def make_default(self) -> Any:
        if self.factory is not None:
            return self.factory()
        if dataclasses.is_dataclass(self.type):
            return self.type()
        return self.default


@dataclass
class LayerSlots:
    """The pieces of one transformer layer that methods change, before the spec is built
    (model/spec.py turns them into megatron-core's `TransformerLayerSubmodules`). Linears are
    `ModuleSpec`s or classes with megatron-core's linear signature; norms are classes;
    `attention_params` are passed to the attention kernel (model/attention.py)."""

    qkv: Any
    proj: Any
    fc1: Any
    fc2: Any
    input_norm: Any
    q_norm: Any
    k_norm: Any
    v_norm: Any
    gate: Any = None  # the attention output gate's linear (None: no gate)
    attention_params: dict[str, Any] = field(default_factory=dict)


class Method:
    """A stability method, as the package sees it. Subclasses set the class attributes and
    override the hooks they need; `register(MyMethod())` makes the config loader, the layer
    spec, the Trainer, the exporters, `inspect` and the benchmarks see it."""

    name: str = ""  # registry key (unique), a Python identifier
    title: str = ""  # its name in prose (the docs' methods table, messages)
    source: str = ""  # where it comes from (paper, framework)
    # layer edits run in ascending order (then by name): a method that replaces a linear
    # (10) edits before one that wraps whatever linear is there (20); the rest 30
    order: int = 30
    fields: tuple[Field, ...] = ()  # the `model.*` keys it owns
    # benchmark / sweep names -> `model` overrides that switch the method on
    variants: dict[str, dict[str, Any]] = {}
    # record fields its hooks log, kept in a sweep's compact series (a regular expression
    # matched against the whole field name)
    series_metrics: str | None = None

    def enabled(self, cfg) -> bool:
        """Whether the method is on in `cfg`."""
        return False

    def validate(self, cfg, world_size: int) -> None:
        """Raise `config.ConfigError` (one line naming the key) for a setting that cannot run."""

    def edit_layer(self, slots: LayerSlots, cfg, layer_number: int) -> None:
        """Change `slots` for transformer layer `layer_number` (1-based); only called when
        the method is enabled. Methods edit in registry order."""

    def attention_params(self, cfg) -> dict[str, Any]:
        """Constructor parameters of the attention kernel (model/attention.py) the method sets;
        called for every method, on or off, so that a kernel sees every parameter."""
        return {}

    def hooks(self, cfg, module, state=None, engine=None) -> list:
        """The step hooks (`hooks.StepHook`) the method needs to train `module` (an engine's
        module or a bare model); `state` (`parallel.ParallelState`) and `engine` are given
        when the caller has them (the Trainer), None otherwise. Only called when enabled."""
        return []

    def add_metrics(self, contrib, parts, cfg) -> None:
        """On a metric step (`metrics.interval`), before the optimizer update: add this rank's
        share of the method's metrics to `contrib` (`metrics.reduce.Contributions`). Called
        once per piece of this rank's stage (`parts`: a `metrics.parts.ModelParts` holding one
        of the embedding, a layer, the final norm, the output layer), with that piece's weights
        whole (under ZeRO-3 gathered for the call). They are reduced over all ranks and logged
        with the other stability metrics. Only called when enabled."""

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        """Why `cfg`'s model cannot be written in format `fmt` ("hf_gpt2", "hf_llama"): one
        phrase per key, e.g. "model.x=true (GPT-2 has no x)". Only called when enabled. The
        default refuses: a method changes the model unless it says otherwise (one that only
        changes training, as z-loss or QK-clip, returns [])."""
        keys = ", ".join(f"model.{f.name}" for f in self.fields) or self.name
        return [f"{keys} ({self.title or self.name} has no counterpart in {fmt})"]

    def layer_params(self, cfg, tp: int) -> int:
        """Parameters the method adds to one transformer layer on one of `tp` tensor-parallel
        ranks, over the plain pre-LN layer (negative where it removes some); model/size.py."""
        return 0

    def summary(self, cfg) -> dict[str, Any]:
        """Its fields in `stable-megatron inspect`'s JSON `model` section (every method)."""
        return {}

    def describe(self, cfg) -> str | None:
        """A few words for `inspect`'s methods line (every method); None: nothing to say."""
        return None


def check_choices(name: str, chosen: list[str], valid: tuple[str, ...]) -> None:
    """`chosen` (a method's list key, e.g. the linears it targets) names each of `valid` at
    most once; else a ConfigError naming `name`."""
    from stable_megatron.config import ConfigError

    bad = [c for c in chosen if c not in valid]
    if bad or len(set(chosen)) != len(chosen):
        raise ConfigError(f"{name}={chosen}: each of {', '.join(valid)} at most once")
