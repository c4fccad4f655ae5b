"""Attention metrics (Zhai et al. 2023; methods.md section 5), exact, on logging steps only.

While capturing, every `SelfAttention` accumulates the `AttentionStatistics` of its
probabilities, from a pass without autograd beside its kernel (see model/attention.py). Logged:
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

from stable_megatron.metrics.parts import ModelParts, head_name, layer_name
from stable_megatron.metrics.reduce import Contributions
from stable_megatron.model.attention import SelfAttention


def attention_modules(parts: ModelParts) -> dict[int, SelfAttention]:
    return {number: layer.self_attention for number, layer in sorted(parts.layers.items())
            if isinstance(layer.self_attention, SelfAttention)}


def start_capture(parts: ModelParts) -> None:
    for module in attention_modules(parts).values():
        module.capture_statistics(True)


def stop_capture(
    contrib: Contributions, parts: ModelParts, num_layers: int, num_heads: int
) -> None:
    """Switch capture off and contribute the statistics: data-parallel ranks their own batch
    rows; TP ranks their own heads, adding zeros for the others so that the keys agree."""
    for number, module in attention_modules(parts).items():
        stats = module.pop_statistics()
        module.capture_statistics(False)
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
