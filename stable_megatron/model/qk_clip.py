"""QK-clip (MuonClip, Kimi K2, arXiv 2507.20534; methods.md section 6; `model.qk_clip`): the
model side.

After an optimizer step, every attention head h whose largest logit in the step,
`m_h = max over the step's tokens and visible pairs of q_i k_j / sqrt(d_head)` (before any
softmax cap), exceeded `tau` gets its query and key projections scaled by
`sqrt(tau / m_h)` each, so that the same batch would now give `m_h = tau`. Heads with
`m_h <= tau` are untouched (bit-identical), which includes `m_h <= 0` (no division by a non-positive
number) and a NaN maximum (a broken step is the spike guard's business, not the clip's).

This module has the pieces that know the model:
- `head_max_logits(q, k)`: the per-head maximum of one forward, from the q and k an attention
  capture hook sees (`model/attention.py`), without autograd, a block of query rows at a time;
- `MaxLogitCollector`: that capture hook, the running maximum over a step's forwards;
- `clip_factors(m, tau)`: the per-head factors, 1 where no clip is due;
- `query_key_scales(attention, factors)`: for each parameter that produces q or k, the
  multiplier of every entry (the head's factor on its q and k entries, 1 elsewhere). The
  standard QKV linear scales its q_h and k_h rows (weight and bias); a QKV layer with a layout
  of its own says which of its entries feed a head's q and k (`head_scales(factors, targets)`,
  the low-rank attention layer); its bias per head as in the standard layout.

The step hook that collects, reduces, and applies the scales to the weights and to ZeRO's
fp32 master copy is `QKClipHook` (stable_megatron/methods/).
"""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import nn

from stable_megatron.model.attention import AttentionCapture, SelfAttention, future_keys
from stable_megatron.model.layers import per_head_rows, scale_like

CAPTURE_OWNER = "qk_clip"  # the name of the collector on each SelfAttention
BLOCK_ROWS = 128  # query rows per block of `head_max_logits`


@torch.no_grad()
def head_max_logits(q: torch.Tensor, k: torch.Tensor, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """[heads] fp32: the largest `q_i k_j / sqrt(d)` over the batch and the causal pairs
    (j <= i) of q, k `[b, h, s, d]`. A block of query rows meets only the keys it can see.
    Cost: one q k^T product over the causal triangle (plus the block diagonal), no softmax."""
    seq, scale = q.size(-2), math.sqrt(q.size(-1))
    best = torch.full((q.size(1),), -math.inf, dtype=torch.float32, device=q.device)
    for start in range(0, seq, block_rows):
        stop = min(seq, start + block_rows)
        scores = torch.matmul(q[:, :, start:stop].float(), k[:, :, :stop].float().transpose(-1, -2))
        scores.masked_fill_(future_keys(start, stop, stop, q.device), -math.inf)
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best / scale


class MaxLogitCollector:
    """A capture hook: the running per-head maximum over the forwards it saw (None before
    the first), for the rank's heads `first_head ..`."""

    def __init__(self) -> None:
        self.max_logits: torch.Tensor | None = None
        self.first_head = 0

    def __call__(self, capture: AttentionCapture) -> None:
        found = head_max_logits(capture.q, capture.k)
        self.first_head = capture.first_head
        self.max_logits = found if self.max_logits is None else torch.maximum(self.max_logits,
                                                                               found)


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """sqrt(tau / m) where m > tau, else exactly 1 (m <= 0, m = -inf for an unseen head, NaN)."""
    over = max_logits > tau
    safe = torch.where(over, max_logits, torch.ones_like(max_logits) * tau)
    return torch.where(over, torch.sqrt(tau / safe), torch.ones_like(max_logits))


def query_key_scales(
    attention: SelfAttention, factors: torch.Tensor
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, fp32 multiplier of the same shape) for every parameter of `attention`'s QKV
    slot that feeds q or k, given this rank's per-head `factors` [heads_local]."""
    qkv, d = attention.linear_qkv, attention.head_dim
    out: list[tuple[nn.Parameter, torch.Tensor]] = []
    qkv_rows = per_head_rows(factors, ["q", "k", "v"], d)
    if hasattr(qkv, "head_scales"):  # a QKV layer of its own layout (MLRA's) scales itself
        out += qkv.head_scales(factors, ("q", "k"))
    elif type(qkv) is ColumnParallelLinear:
        out.append((qkv.weight, scale_like(qkv.weight, qkv_rows)))
    else:  # config validation keeps sigma-reparam (and any other wrapper) off this path
        raise TypeError(f"QK-clip cannot scale the heads of a {type(qkv).__name__} QKV layer")
    if getattr(qkv, "bias", None) is not None:
        out.append((qkv.bias, scale_like(qkv.bias, qkv_rows)))
    return out
