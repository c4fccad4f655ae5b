"""Attention metrics (Zhai et al. 2023; methods.md section 5), exact, on logging steps only.

While capturing, every `SelfAttention` hands its capture hook the q and k its kernel took
(`AttentionCapture`, model/attention.py); the hook here computes the statistics of the causal
attention probabilities from them in a pass without autograd, a block of query rows at a time
(fused kernels never materialise the probabilities), and accumulates them over the step's
forwards. The kernel's output and gradients are untouched. Logged:
- `attn_entropy/layer_NN/head_HH`: mean over the step's batch rows and query positions of
  `H = -sum_j p_j log p_j` (visible keys j), fp32; `attn_entropy/layer_NN/min`: its minimum
  over the heads of the layer (collapse: near 0);
- `attn_entropy_norm/layer_NN/head_HH` and `.../min`: the same with each query's H divided by
  log(number of keys it sees) (1 = uniform attention), over query positions 2.. (the first
  sees a single key);
- `attn_logit_max/layer_NN`: the largest attention logit `q k / sqrt(d_head)` over visible
  pairs, before capping; `attn_logit_max_capped/layer_NN`: after capping (with
  `model.softmax_cap` only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stable_megatron.metrics.parts import ModelParts, head_name, layer_name
from stable_megatron.metrics.reduce import Contributions
from stable_megatron.model.attention import (
    AttentionCapture,
    SelfAttention,
    future_keys,
    masked_logits,
    scaled_scores,
)


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
    """The statistics of causal attention over q, k ([b, h, s, d]) with softmax cap `cap`,
    without autograd, computed a block of query rows at a time against the keys those rows
    can see (`block_rows`, default `statistics_block_rows`; `block_rows >= s`: the whole
    probability matrix at once). The logits are the model's (`model.attention.masked_logits`)."""
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


class StatisticsCollector:
    """A `SelfAttention` capture hook: accumulates the `AttentionStatistics` of every captured
    forward (None until one ran)."""

    def __init__(self) -> None:
        self.statistics: AttentionStatistics | None = None

    def __call__(self, capture: AttentionCapture) -> None:
        stats = attention_statistics(capture.q, capture.k, capture.softmax_cap,
                                     capture.first_head)
        self.statistics = stats if self.statistics is None else self.statistics.merge(stats)


def attention_modules(parts: ModelParts) -> dict[int, SelfAttention]:
    return {number: layer.self_attention for number, layer in sorted(parts.layers.items())
            if isinstance(layer.self_attention, SelfAttention)}


CAPTURE_OWNER = "metrics"  # the name of the metrics' capture hook on each SelfAttention


def start_capture(parts: ModelParts) -> None:
    for module in attention_modules(parts).values():
        module.set_capture_hook(CAPTURE_OWNER, StatisticsCollector())


def stop_capture(
    contrib: Contributions, parts: ModelParts, num_layers: int, num_heads: int
) -> None:
    """Remove the capture hooks and contribute the statistics: data-parallel ranks their own
    batch rows; TP ranks their own heads, adding zeros for the others so that the keys agree."""
    for number, module in attention_modules(parts).items():
        hook = module.capture_hooks.get(CAPTURE_OWNER)
        module.set_capture_hook(CAPTURE_OWNER, None)
        stats = hook.statistics if isinstance(hook, StatisticsCollector) else None
        layer = layer_name(number, num_layers)
        held = range(0, 0)
        if stats is not None:
            held = range(stats.first_head, stats.first_head + stats.entropy_sum.numel())
        for head in range(num_heads):
            name = f"{layer}/{head_name(head, num_heads)}"
            if head in held:
                i = head - stats.first_head
                contrib.mean(f"attn_entropy/{name}", stats.entropy_sum[i], stats.rows)
                contrib.mean(f"attn_entropy_norm/{name}", stats.normalized_entropy_sum[i],
                             stats.normalized_rows)
            else:
                contrib.mean(f"attn_entropy/{name}", 0.0, 0)
                contrib.mean(f"attn_entropy_norm/{name}", 0.0, 0)
        found = stats is not None
        contrib.max(f"attn_logit_max/{layer}", stats.max_logit if found else -math.inf)
        if module.softmax_cap is not None:
            contrib.max(f"attn_logit_max_capped/{layer}",
                        stats.max_capped_logit if found else -math.inf)


def add_minima(metrics: dict[str, float]) -> None:
    """`attn_entropy/layer_NN/min` and `attn_entropy_norm/layer_NN/min` from the logged heads
    (on the logging rank, after the reduction: the minimum of the heads' means)."""
    minima: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(("attn_entropy/", "attn_entropy_norm/")) and "/head_" in key:
            layer_key = key.rsplit("/", 1)[0] + "/min"
            minima[layer_key] = min(minima.get(layer_key, math.inf), value)
    metrics.update(minima)
