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
`capture_statistics(True)`, every forward also accumulates `AttentionStatistics` (entropy per
head, max logit before and after capping) until `pop_statistics()` returns and resets them.
The output and its gradients still come from the configured kernel; the statistics come from a
second pass over q and k without autograd, a block of query rows at a time (fused kernels never
materialise the probabilities). The math kernel has them at hand and reads them directly.
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


def future_keys(start: int, stop: int, keys: int, device: torch.device) -> torch.Tensor:
    """[stop - start, keys] bool: True where key j lies after query i (start <= i < stop)."""
    queries = torch.arange(start, stop, device=device)
    return torch.arange(keys, device=device)[None, :] > queries[:, None]


def scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`q k^T / sqrt(d_head)` in fp32, before capping and masking: [b, h, s_q, s_k]."""
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.size(-1))


def masked_logits(scores: torch.Tensor, cap: float | None, future: torch.Tensor) -> torch.Tensor:
    """The logits the softmax takes: `scores` capped, then the `future` keys at -inf."""
    return capped(scores, cap).masked_fill(future, float("-inf"))


def causal_logits(q: torch.Tensor, k: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """Attention logits after capping, fp32, future keys at -inf: [b, h, s, s]."""
    seq = q.size(-2)
    return masked_logits(scaled_scores(q, k), cap, future_keys(0, seq, seq, q.device))


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


def _statistics(
    scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, future: torch.Tensor,
    start: int, first_head: int,
) -> AttentionStatistics:
    """Statistics of the query rows `start ..` of one forward: `scores` before capping,
    `logits` after capping and masking, `probs` their softmax ([b, h, rows, keys]); `future`
    the [rows, keys] mask."""
    batch, _, rows, _ = probs.shape
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # [b, h, rows]
    # query i sees i + 1 keys; the first query sees one (H = 0 / log 1) and is left out
    skip = 1 if start == 0 else 0
    visible = torch.arange(start + 1 + skip, start + rows + 1, device=probs.device,
                           dtype=torch.float32)
    normalized = entropy[..., skip:] / visible.log()
    return AttentionStatistics(
        first_head=first_head,
        entropy_sum=entropy.sum(dim=(0, 2)),
        normalized_entropy_sum=normalized.sum(dim=(0, 2)),
        rows=batch * rows,
        normalized_rows=batch * (rows - skip),
        max_logit=scores.masked_fill(future, float("-inf")).amax(),
        max_capped_logit=logits.amax(),
    )


def causal_attention_with_statistics(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float | None, first_head: int = 0
) -> tuple[torch.Tensor, AttentionStatistics]:
    """The math kernel's output (the same operations as `causal_attention(kernel="math")`) and
    the statistics of its probabilities."""
    scores = scaled_scores(q, k)
    seq = q.size(-2)
    future = future_keys(0, seq, seq, q.device)
    logits = masked_logits(scores, cap, future)
    probs = torch.softmax(logits, dim=-1)
    context = torch.matmul(probs.to(v.dtype), v)
    with torch.no_grad():
        stats = _statistics(scores.detach(), logits.detach(), probs.detach(), future, 0,
                            first_head)
    return context, stats


STATISTICS_BLOCK_ELEMENTS = 1 << 24  # logits per block of query rows (64 MiB in fp32)
STATISTICS_MIN_BLOCKS = 8  # blocks of query rows at least: the causal triangle, not the square


def statistics_block_rows(batch: int, heads: int, seq: int) -> int:
    """Query rows per block of `attention_statistics`: at most `STATISTICS_BLOCK_ELEMENTS`
    logits in a block, and at least `STATISTICS_MIN_BLOCKS` blocks. A block of rows
    `start .. stop - 1` needs the keys `0 .. stop - 1` only, so n blocks compute about
    (n + 1) / 2n of the full score matrix (56% at 8; on 2 CPU cores at seq 512, 8 blocks
    took 0.54x the time of one)."""
    budget = max(1, STATISTICS_BLOCK_ELEMENTS // (batch * heads * seq))
    return max(1, min(budget, -(-seq // STATISTICS_MIN_BLOCKS)))


@torch.no_grad()
def attention_statistics(
    q: torch.Tensor, k: torch.Tensor, cap: float | None, first_head: int = 0,
    block_rows: int | None = None,
) -> AttentionStatistics:
    """The statistics of causal attention over q, k ([b, h, s, d]) without autograd, computed
    a block of query rows at a time against the keys those rows can see (`block_rows`,
    default `statistics_block_rows`): what the capture costs next to a fused kernel."""
    batch, heads, seq, _ = q.shape
    rows = block_rows or statistics_block_rows(batch, heads, seq)
    q, k = q.detach(), k.detach()
    total = None
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        scores = scaled_scores(q[:, :, start:stop], k[:, :, :stop])
        future = future_keys(start, stop, stop, q.device)
        logits = masked_logits(scores, cap, future)
        block = _statistics(scores, logits, torch.softmax(logits, dim=-1), future, start,
                            first_head)
        total = block if total is None else total.merge(block)
    return total


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
        """Switch the statistics capture on (forwards accumulate `AttentionStatistics`) or
        off; either way the accumulated statistics are dropped."""
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
        if self._capture and self.kernel == "math":  # the probabilities are at hand
            context, stats = causal_attention_with_statistics(
                q, k, v, self.softmax_cap, self.first_head
            )
        else:
            context = causal_attention(q, k, v, self.kernel, self.softmax_cap)
            stats = (attention_statistics(q, k, self.softmax_cap, self.first_head)
                     if self._capture else None)
        if stats is not None:
            self._statistics = stats if self._statistics is None else self._statistics.merge(stats)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads_local * self.head_dim)
        return self.linear_proj(context)
