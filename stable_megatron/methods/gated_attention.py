"""Head-wise gated attention (Qiu et al. 2025, arXiv 2505.06708; `model.attention_gate`): each
head's attention output is multiplied by sigmoid(x W_g + b_g), one gate per head and token,
from the attention's input x. The gate is a column-parallel d -> heads linear in the attention's
`linear_gate` slot (model/attention.py applies it; its columns are heads, so each tensor-parallel
rank computes the gates of its own heads)."""

from __future__ import annotations

from stable_megatron.methods.base import Field, LayerSlots, Method
from stable_megatron.methods.registry import register


class GatedAttention(Method):
    name = "gated_attention"
    title = "gated attention (head-wise)"
    source = "Qiu et al. 2025, arXiv 2505.06708"
    fields = (Field("attention_gate", bool, False),)
    variants = {"gated_attention": {"attention_gate": True}}

    def enabled(self, cfg) -> bool:
        return cfg.model.attention_gate

    def edit_layer(self, slots: LayerSlots, cfg, layer_number: int) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear

        slots.gate = ColumnParallelLinear

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        model = "GPT-2" if fmt == "hf_gpt2" else "Llama"
        return [f"model.attention_gate=true ({model} has no gate on the attention output)"]

    def layer_params(self, cfg, tp: int) -> int:
        m = cfg.model
        heads = m.num_attention_heads
        return m.hidden_size * heads // tp + (heads // tp if m.add_bias_linear else 0)

    def describe(self, cfg) -> str | None:
        return "gated attention" if cfg.model.attention_gate else None


register(GatedAttention())
