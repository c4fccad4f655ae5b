"""Where the layer's norms sit (`model.norm_placement`), Rybakov et al. [B]: the plain pre-LN
GPT, a norm on every head's query and key (QK-norm, Dehghani et al. 2023), plus norms on the
attention and MLP outputs (QK + Proj/FC2 norm), or per-head norms on q, k and v in place of
the input norm (QKV-norm).

| norm_placement | input norm | q/k norm | v norm | Proj/FC2 output norm |
| pre_ln         | yes        |          |        |                      |
| qk_norm        | yes        | yes      |        |                      |
| qk_fc_norm     | yes        | yes      |        | yes                  |
| qkv_norm       |            | yes      | yes    |                      |
"""

from __future__ import annotations

from typing import Literal

from stable_megatron.methods.base import Field, LayerSlots, Method
from stable_megatron.methods.registry import register

Placement = Literal["pre_ln", "qk_norm", "qk_fc_norm", "qkv_norm"]


class NormPlacement(Method):
    name = "norm_placement"
    title = "QK-norm, QK + Proj/FC2 norm, QKV-norm"
    source = "[B] Rybakov et al. 2024; QK-norm: Dehghani et al. 2023"
    order = 20  # wraps the Proj / FC2 linears, whichever they are
    fields = (Field("norm_placement", Placement, "pre_ln"),)
    variants = {
        "qk_norm": {"norm_placement": "qk_norm"},
        "qk_fc_norm": {"norm_placement": "qk_fc_norm"},
        "qkv_norm": {"norm_placement": "qkv_norm"},
    }

    def enabled(self, cfg) -> bool:
        return cfg.model.norm_placement != "pre_ln"

    def edit_layer(self, slots: LayerSlots, cfg, layer_number: int) -> None:
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.spec_utils import ModuleSpec

        from stable_megatron.model.layers import HeadLayerNorm, LinearWithOutputNorm

        placement = cfg.model.norm_placement
        slots.q_norm = slots.k_norm = HeadLayerNorm
        if placement == "qkv_norm":
            slots.v_norm, slots.input_norm = HeadLayerNorm, IdentityOp
        if placement == "qk_fc_norm":
            slots.proj = ModuleSpec(module=LinearWithOutputNorm, params={"linear": slots.proj})
            slots.fc2 = ModuleSpec(module=LinearWithOutputNorm, params={"linear": slots.fc2})

    def export_blockers(self, cfg, fmt: str) -> list[str]:
        placement = cfg.model.norm_placement
        if fmt == "hf_gpt2":
            return [f"model.norm_placement={placement} (GPT-2 has pre-LN only, no QK/V/Proj/FC2 "
                    f"norms)"]
        return [f"model.norm_placement={placement} (Llama: pre_ln)"]

    def layer_params(self, cfg, tp: int) -> int:
        from stable_megatron.model.size import norm_width

        m = cfg.model
        nw, placement = norm_width(m), m.norm_placement
        n = 2 * nw * m.head_dim  # q and k head norms, replicated
        if placement == "qkv_norm":
            n += nw * m.head_dim - nw * m.hidden_size  # a v head norm; no input norm
        if placement == "qk_fc_norm":
            n += 2 * nw * m.hidden_size
        return n

    def summary(self, cfg) -> dict:
        return {"norm_placement": cfg.model.norm_placement}

    def describe(self, cfg) -> str:
        return f"norms {cfg.model.norm_placement}"


register(NormPlacement())
