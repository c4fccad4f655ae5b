"""Tensor-parallel causal self-attention, a drop-in for the `self_attention` slot of a
megatron-core `TransformerLayer` spec.

QKV is one column-parallel linear whose output is laid out per head as `[q_h; k_h; v_h]`, so a
split over tensor-parallel ranks hands every rank whole heads and TP=2 reproduces TP=1 exactly.
Proj is row-parallel; its bias is returned separately for megatron-core's bias-dropout-add.

Two interchangeable kernels compute the attention itself:
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with a causal mask; it dispatches
  to flash / memory-efficient kernels on GPU and never materialises the probabilities.
- `math`: the explicit `softmax(q k^T / sqrt(d)) v`, which materialises the probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    linear_proj: ModuleSpec | type


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa"
) -> torch.Tensor:
    """q, k, v: [batch, heads, seq, head_dim] -> [batch, heads, seq, head_dim]."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    seq = q.size(-2)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu_(1)
    probs = torch.softmax(scores.float().masked_fill(mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class SelfAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        backend: str = "sdpa",
        **unused,
    ) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.backend = backend
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp
        width = config.num_attention_heads * self.head_dim
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            3 * width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            width,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, **_):
        seq, batch, _ = hidden_states.shape
        qkv, _ = self.linear_qkv(hidden_states)
        q, k, v = qkv.view(seq, batch, self.heads_local, 3, self.head_dim).unbind(dim=3)
        if rotary_pos_emb is not None:
            q = apply_rotary_pos_emb(q, rotary_pos_emb, config=self.config)
            k = apply_rotary_pos_emb(k, rotary_pos_emb, config=self.config)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        context = causal_attention(q, k, v, self.backend)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads_local * self.head_dim)
        return self.linear_proj(context)
