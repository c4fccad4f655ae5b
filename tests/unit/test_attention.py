"""Attention kernels, softmax capping and rotary angles, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from stable_megatron.model.attention import (
    attention_kernel,
    causal_attention,
    causal_logits,
)


def qkv(seed: int = 0, scale: float = 1.0, shape=(2, 3, 24, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale for _ in range(3)]


def test_math_path_matches_sdpa_without_cap():
    q, k, v = qkv()
    torch.testing.assert_close(
        causal_attention(q, k, v, "math"), causal_attention(q, k, v, "sdpa"), rtol=1e-5, atol=1e-6
    )


def test_math_path_is_the_explicit_capped_softmax():
    q, k, v = qkv(scale=4.0)
    cap = 5.0
    d = q.size(-1)
    scores = cap * torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(d) / cap)
    seq = q.size(-2)
    for i in range(seq):
        scores[..., i, i + 1:] = float("-inf")
    expected = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(causal_attention(q, k, v, "math", cap), expected)


def test_capped_logits_never_exceed_the_cap():
    q, k, _ = qkv(scale=30.0)  # raw logits in the hundreds
    cap = 5.0
    raw = causal_logits(q, k, None)
    finite_raw = raw[torch.isfinite(raw)]
    assert finite_raw.abs().max() > 10 * cap
    logits = causal_logits(q, k, cap)
    finite = logits[torch.isfinite(logits)]
    assert finite.abs().max() <= cap
    # masked (future) positions stay masked, visible ones stay finite
    assert torch.equal(torch.isfinite(logits), torch.isfinite(raw))


def test_fused_flex_path_agrees_with_the_exact_path():
    q, k, v = qkv(seed=1, scale=3.0)
    for cap in (2.0, 50.0):
        torch.testing.assert_close(
            causal_attention(q, k, v, "flex", cap),
            causal_attention(q, k, v, "math", cap),
            rtol=1e-4,
            atol=1e-5,
        )


def test_sdpa_refuses_a_cap():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="cap"):
        causal_attention(q, k, v, "sdpa", 50.0)


def test_auto_kernel_choice():
    assert attention_kernel("auto", None, on_cuda=False) == "sdpa"
    assert attention_kernel("auto", None, on_cuda=True) == "sdpa"
    assert attention_kernel("auto", 50.0, on_cuda=False) == "math"
    assert attention_kernel("auto", 50.0, on_cuda=True) == "flex"
    assert attention_kernel("math", None, on_cuda=True) == "math"


def test_rope_angles_match_megatron_core():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from stable_megatron.model.gpt import rope_angles

    rotary = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000,
                             use_cpu_initialization=True)
    freqs = rotary.get_freqs_non_repeated(12)
    expected = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    torch.testing.assert_close(rope_angles(12, 16, 10000.0, torch.device("cpu")), expected)
