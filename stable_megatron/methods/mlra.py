"""Multi-head low-rank attention [A] (`model.attention=mlra`): the chosen projections of the
attention (q, k, v and/or the output o) become per-head low-rank factors of rank r
(the layers and their tensor-parallel sharding: model/mlra.py; the factorisation is a project
choice, docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stable_megatron.methods.base import Field, LayerSlots, Method, check_choices
from stable_megatron.methods.registry import register

TARGETS = ("q", "k", "v", "o")


@dataclass
class MLRAConfig:
    """Multi-head low-rank attention [A]; the factorisation is a project choice (methods.md)."""

    rank: int | None = None  # default: head_dim // 2 (resolved_rank); 1 .. head_dim
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"])  # any of q, k, v, o
    # factor init stds: "paper" both at init_std (smaller initial outputs, the paper's
    # variance argument); "balanced"/"input_side" keep the full-rank output scale
    factor_init: Literal["paper", "balanced", "input_side"] = "paper"

    def resolved_rank(self, head_dim: int) -> int:
        """`rank`, or the default head_dim // 2 (the one place the default is written)."""
        return self.rank if self.rank is not None else head_dim // 2


class MLRA(Method):
    name = "mlra"
    title = "MLRA (multi-head low-rank attention)"
    source = "[A]"
    order = 10  # replaces linears
    fields = (Field("attention", Literal["standard", "mlra"], "standard"),
              Field("mlra", MLRAConfig))
    variants = {
        "mlra": {"attention": "mlra"},  # targets q, k, v; rank d_head / 2 (the config defaults)
        "mlra_qkvo": {"attention": "mlra", "mlra": {"targets": ["q", "k", "v", "o"]}},
    }

    def enabled(self, cfg) -> bool:
        return cfg.model.attention == "mlra"

    def validate(self, cfg, world_size: int) -> None:
        from stable_megatron.config import ConfigError

        m = cfg.model
        check_choices("model.mlra.targets", m.mlra.targets, TARGETS)
        if not self.enabled(cfg):
            return
        if not m.mlra.targets:
            raise ConfigError("model.mlra.targets is empty: name at least one of q, k, v, o")
        rank = m.mlra.resolved_rank(m.head_dim)
        if not 0 < rank <= m.head_dim:
            raise ConfigError(
                f"model.mlra.rank={rank}: must be between 1 and the head dim "
                f"(hidden_size / num_attention_heads = {m.head_dim}) to be low rank"
            )

    def edit_layer(self, slots: LayerSlots, cfg, layer_number: int) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        from stable_megatron.model.mlra import mlra_linear_specs

        m = cfg.model  # validation keeps sigma-reparam off the slots MLRA replaces
        qkv, proj = mlra_linear_specs(m.mlra.resolved_rank(m.head_dim), m.mlra.targets,
                                      m.mlra.factor_init)
        if qkv is not ColumnParallelLinear:
            slots.qkv = qkv
        if proj is not RowParallelLinear:
            slots.proj = proj

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        if fmt == "hf_gpt2":
            return ["model.attention=mlra (GPT-2 has full-rank QKV and output projections)"]
        return ["model.attention=mlra (Llama: standard)"]

    def layer_params(self, cfg, tp: int) -> int:
        m = cfg.model
        d, heads, dh = m.hidden_size, m.num_attention_heads, m.head_dim
        r = m.mlra.resolved_rank(dh)
        return sum(heads * r * (d + dh) // tp - d * d // tp for _ in m.mlra.targets)

    def summary(self, cfg) -> dict[str, Any]:
        return {"attention": cfg.model.attention}

    def describe(self, cfg) -> str:
        return f"{cfg.model.attention} attention"


register(MLRA())
