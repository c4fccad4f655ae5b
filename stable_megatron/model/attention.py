"""Tensor-parallel causal self-attention, a drop-in for the `self_attention` slot of a
megatron-core `TransformerLayer` spec, with the layer-norm placements and softmax capping of
Rybakov et al. (methods.md section 3).

QKV is one column-parallel linear whose output is laid out per head as `[q_h; k_h; v_h]`, so a
split over tensor-parallel ranks hands every rank whole heads and TP=2 reproduces TP=1 exactly.
Proj is row-parallel; its bias is returned separately for megatron-core's bias-dropout-add.

Optional pieces (all per head over d_head, parameters shared by the heads, TP-replicated):
- `q_layernorm`, `k_layernorm` (qk_norm), plus `v_layernorm` (qkv_norm) on the QKV output;
- `softmax_cap` c: logits `s = q k^T / sqrt(d)` become `c * tanh(s / c)` before the mask.

Kernels (`attention_kernel`):
- `sdpa`: `scaled_dot_product_attention`, causal; flash / memory-efficient kernels on GPU. No cap.
- `flex`: FlexAttention with the cap as a `score_mod`: the fused path for capped attention on
  GPU (compiled there; eager, and slow, on CPU).
- `math`: the explicit softmax, which materialises the probabilities: exact and always works.

Statistics capture (for the stability metrics, on logging steps only): after
`capture_statistics(True)`, every forward takes the math path whatever the kernel (the output
is the same up to fp32 rounding) and accumulates `AttentionStatistics` (entropy per head, max
logit before and after capping) until `pop_statistics()` returns and resets them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_layernorm: ModuleSpec | type = IdentityOp
    k_layernorm: ModuleSpec | type = IdentityOp
    v_layernorm: ModuleSpec | type = IdentityOp


def capped(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else cap * torch.tanh(scores / cap)


def causal_logits(q: torch.Tensor, k: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """Attention logits after capping, fp32, future keys at -inf: [b, h, s, s]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.size(-1))
    seq = q.size(-2)
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu_(1)
    return capped(scores, cap).masked_fill(future, float("-inf"))


_compiled_flex = None


def _flex_attention(q, k, v, cap: float):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, batch, head, q_idx, kv_idx):
        score = cap * torch.tanh(score / cap)
        return torch.where(q_idx >= kv_idx, score, float("-inf"))

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, score_mod=score_mod)
    return flex_attention(q, k, v, score_mod=score_mod)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: str = "sdpa",
    cap: float | None = None,
) -> torch.Tensor:
    """q, k, v: [batch, heads, seq, head_dim] -> [batch, heads, seq, head_dim]."""
    if kernel == "sdpa":
        if cap is not None:
            raise ValueError("the sdpa kernel cannot apply a softmax cap: use flex or math")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kernel == "flex":
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return _flex_attention(q, k, v, cap)
    probs = torch.softmax(causal_logits(q, k, cap), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


@dataclass
class AttentionStatistics:
    """Sums over the captured forwards of one layer, for this rank's heads
    (global heads `first_head .. first_head + heads - 1`), in fp32:
    - `entropy_sum[h]`: sum over batch rows and query positions of
      `H = -sum_j p_j log p_j` over the visible keys j; `rows` terms;
    - `normalized_entropy_sum[h]`: sum over batch rows and query positions 2.. of
      `H / log(number of visible keys)` (the first query sees one key: H = 0 / log 1);
      `normalized_rows` terms;
    - `max_logit`: the largest visible `q k / sqrt(d)` before capping, `max_capped_logit` after.
    """

    first_head: int
    entropy_sum: torch.Tensor
    normalized_entropy_sum: torch.Tensor
    rows: int
    normalized_rows: int
    max_logit: torch.Tensor
    max_capped_logit: torch.Tensor

    def merge(self, other: AttentionStatistics) -> AttentionStatistics:
        return AttentionStatistics(
            first_head=self.first_head,
            entropy_sum=self.entropy_sum + other.entropy_sum,
            normalized_entropy_sum=self.normalized_entropy_sum + other.normalized_entropy_sum,
            rows=self.rows + other.rows,
            normalized_rows=self.normalized_rows + other.normalized_rows,
            max_logit=torch.maximum(self.max_logit, other.max_logit),
            max_capped_logit=torch.maximum(self.max_capped_logit, other.max_capped_logit),
        )


def causal_attention_with_statistics(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float | None, first_head: int = 0
) -> tuple[torch.Tensor, AttentionStatistics]:
    """The math kernel's output (the same operations as `causal_attention(kernel="math")`) and
    the statistics of its probabilities."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.size(-1))
    batch, _, seq, _ = q.shape
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu_(1)
    logits = capped(scores, cap).masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    context = torch.matmul(probs.to(v.dtype), v)
    with torch.no_grad():
        entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # [b, h, s]
        visible = torch.arange(2, seq + 1, device=q.device, dtype=torch.float32)
        normalized = entropy[..., 1:] / visible.log()
        stats = AttentionStatistics(
            first_head=first_head,
            entropy_sum=entropy.sum(dim=(0, 2)),
            normalized_entropy_sum=normalized.sum(dim=(0, 2)),
            rows=batch * seq,
            normalized_rows=batch * (seq - 1),
            max_logit=scores.detach().masked_fill(future, float("-inf")).amax(),
            max_capped_logit=logits.detach().amax(),
        )
    return context, stats


def attention_kernel(requested: str, cap: float | None, on_cuda: bool) -> str:
    """The kernel for `model.attention_backend`: `auto` takes the fused kernel that supports
    the configuration (SDPA without a cap; FlexAttention with one on GPU, math on CPU)."""
    if requested != "auto":
        return requested
    if cap is None:
        return "sdpa"
    return "flex" if on_cuda else "math"


class SelfAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        kernel: str = "sdpa",
        softmax_cap: float | None = None,
        **unused,
    ) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        if kernel == "sdpa" and softmax_cap is not None:
            raise ValueError("model.softmax_cap needs the flex or math attention kernel")
        self.layer_number = layer_number
        self.kernel = kernel
        self.softmax_cap = softmax_cap
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp
        # heads are split over TP ranks in order: this rank holds first_head .. + heads_local - 1
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
        self.first_head = tp_rank * self.heads_local
        self._capture = False
        self._statistics: AttentionStatistics | None = None
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
        eps = config.layernorm_epsilon
        head_norm = {"config": config, "hidden_size": self.head_dim, "eps": eps}
        self.q_layernorm = build_module(submodules.q_layernorm, **head_norm)
        self.k_layernorm = build_module(submodules.k_layernorm, **head_norm)
        self.v_layernorm = build_module(submodules.v_layernorm, **head_norm)
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

    def capture_statistics(self, enabled: bool = True) -> None:
        """Switch the statistics capture on (forwards take the math path and accumulate
        `AttentionStatistics`) or off (the configured kernel again); either way the
        accumulated statistics are dropped."""
        self._capture = enabled
        self._statistics = None

    def pop_statistics(self) -> AttentionStatistics | None:
        """The statistics accumulated since capture was switched on or last popped (None if no
        forward ran); resets them."""
        stats, self._statistics = self._statistics, None
        return stats

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, **_):
        seq, batch, _ = hidden_states.shape
        qkv, _ = self.linear_qkv(hidden_states)
        q, k, v = qkv.view(seq, batch, self.heads_local, 3, self.head_dim).unbind(dim=3)
        q, k, v = self.q_layernorm(q), self.k_layernorm(k), self.v_layernorm(v)
        if rotary_pos_emb is not None:
            q = apply_rotary_pos_emb(q, rotary_pos_emb, config=self.config)
            k = apply_rotary_pos_emb(k, rotary_pos_emb, config=self.config)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self._capture:
            context, stats = causal_attention_with_statistics(
                q, k, v, self.softmax_cap, self.first_head
            )
            self._statistics = stats if self._statistics is None else self._statistics.merge(stats)
        else:
            context = causal_attention(q, k, v, self.kernel, self.softmax_cap)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads_local * self.head_dim)
        return self.linear_proj(context)
