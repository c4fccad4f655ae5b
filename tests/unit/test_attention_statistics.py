"""The attention-statistics pass of the metrics (metrics/attention.py) against a direct
computation from the materialised probabilities, whatever the block size; the capture hook's
accumulation over forwards. (tests/unit/test_metrics.py checks the logged numbers on a trained
model, tests/distributed/test_metrics_parity.py that every layout logs the same.)"""

from __future__ import annotations

import math

import pytest
import torch

from stable_megatron.metrics.attention import (
    STATISTICS_BLOCK_ELEMENTS,
    StatisticsCollector,
    attention_statistics,
    statistics_block_rows,
)
from stable_megatron.model.attention import AttentionCapture


def direct(q: torch.Tensor, k: torch.Tensor, cap: float | None) -> dict[str, torch.Tensor]:
    """Entropy sums per head, normalised entropy sums, max logits before / after the cap, from
    the whole probability matrix, written out independently of the code under test."""
    seq, d = q.size(-2), q.size(-1)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()
    logits = scores if cap is None else cap * torch.tanh(scores / cap)
    probs = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    h = -plogp.sum(-1)  # [b, heads, s]
    normalized = h[..., 1:] / torch.arange(2, seq + 1).double().log()
    return {"entropy_sum": h.sum(dim=(0, 2)), "normalized_entropy_sum": normalized.sum(dim=(0, 2)),
            "max_logit": scores[..., visible].max(), "max_capped_logit": logits[..., visible].max()}


@pytest.mark.parametrize("rows_per_block", [None, 1, 3, 8, 100])
@pytest.mark.parametrize("cap", [None, 1.5])
def test_blocked_statistics_equal_the_materialised_ones(rows_per_block, cap):
    """Blocks of query rows (1 row, blocks that do not divide the sequence, one block, the
    default) give the statistics of the full probability matrix, without autograd."""
    torch.manual_seed(1)
    batch, heads, seq = 2, 3, 8
    q, k = (3 * torch.randn(batch, heads, seq, 4, requires_grad=True) for _ in range(2))
    got = attention_statistics(q, k, cap, first_head=3, block_rows=rows_per_block)
    want = direct(q.detach(), k.detach(), cap)
    assert got.first_head == 3 and not got.entropy_sum.requires_grad
    assert (got.rows, got.normalized_rows) == (batch * seq, batch * (seq - 1))
    for field, value in want.items():
        torch.testing.assert_close(getattr(got, field).double(), value, rtol=1e-5, atol=1e-5,
                                   msg=field)
    if cap is not None:
        assert got.max_capped_logit <= cap < got.max_logit
    else:
        assert torch.equal(got.max_logit, got.max_capped_logit)


def test_statistics_blocks_follow_the_triangle_and_the_memory_budget():
    assert statistics_block_rows(2, 6, 512) == 64  # 8 blocks: the budget allows the whole
    assert statistics_block_rows(1, 16, 4096) == 256  # the budget: 256 x 4096 x 16 = 2^24
    assert statistics_block_rows(1, 16, 4096) * 16 * 4096 <= STATISTICS_BLOCK_ELEMENTS
    assert statistics_block_rows(64, 64, 1 << 16) == 1  # never less than a row
    assert statistics_block_rows(1, 1, 5) == 1


def test_collector_accumulates_the_captured_forwards():
    torch.manual_seed(2)
    batches = [[torch.randn(2, 2, 6, 4) for _ in range(2)] for _ in range(3)]
    collector = StatisticsCollector()
    assert collector.statistics is None
    for q, k in batches:
        collector(AttentionCapture(q, k, 2.0, first_head=2))
    stats = collector.statistics
    assert stats.first_head == 2 and stats.rows == 3 * 2 * 6
    parts = [direct(q, k, 2.0) for q, k in batches]
    torch.testing.assert_close(stats.entropy_sum.double(), sum(p["entropy_sum"] for p in parts),
                               rtol=1e-5, atol=1e-5)
    assert stats.max_capped_logit.item() == pytest.approx(
        max(p["max_capped_logit"].item() for p in parts), rel=1e-6)
