"""Attention kernels, softmax capping and rotary angles, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from stable_megatron.model.attention import (
    KERNELS,
    causal_attention,
    causal_logits,
)
from stable_megatron.model.spec import attention_kernel


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


# --------------------------------------------------------------------------------------------
# Kernels as parts: what each supports, the spec's choice, the capture hook


def test_kernels_refuse_what_they_do_not_support():
    from types import SimpleNamespace

    from stable_megatron.model.attention import FlexAttention, MathAttention, SdpaAttention

    with pytest.raises(ValueError, match="sdpa kernel cannot apply a softmax cap: use flex, math"):
        SdpaAttention(softmax_cap=50.0)
    for kernel in KERNELS.values():
        assert not kernel.supports_dropout
        with pytest.raises(ValueError, match="attention dropout"):
            kernel(SimpleNamespace(attention_dropout=0.1))
        kernel(SimpleNamespace(attention_dropout=0.0))
    assert FlexAttention(softmax_cap=5.0).softmax_cap == MathAttention(softmax_cap=5.0).softmax_cap
    assert set(KERNELS) == {"sdpa", "flex", "math"}


@pytest.mark.parametrize("backend", ["sdpa", "flex", "math"])
def test_config_validation_agrees_with_the_kernels_support(backend):
    """The config refuses a cap for exactly the kernels that cannot apply one, and attention
    dropout for all of them (no kernel applies it)."""
    from stable_megatron.config import ConfigError, config_from_dict, validate

    def check(**model):
        validate(config_from_dict({"model": {"attention_backend": backend, **model}}), 1)

    check()
    if KERNELS[backend].supports_cap:
        check(softmax_cap=50.0)
    else:
        with pytest.raises(ConfigError, match="softmax_cap"):
            check(softmax_cap=50.0)
    if not KERNELS[backend].supports_dropout:
        with pytest.raises(ConfigError, match="model.attention_dropout"):
            check(attention_dropout=0.1)


@pytest.mark.parametrize(("model", "kernel"), [
    ({}, "SdpaAttention"),
    ({"softmax_cap": 2.0}, "MathAttention"),  # auto on CPU
    ({"attention_backend": "flex", "softmax_cap": 2.0}, "FlexAttention"),
    ({"attention_backend": "math"}, "MathAttention"),
])
def test_core_attention_slot_follows_the_config(model, kernel):
    from stable_megatron.config import config_from_dict
    from stable_megatron.model.spec import core_attention_spec, layer_spec

    cfg = config_from_dict({"model": model})
    spec = core_attention_spec(cfg, torch.device("cpu"))
    assert spec.module.__name__ == kernel
    assert spec.params == {"softmax_cap": model.get("softmax_cap")}
    slot = layer_spec(cfg, torch.device("cpu")).submodules.self_attention.submodules
    assert slot.core_attention.module is spec.module


def _self_attention(model: dict):
    from megatron.core.transformer.spec_utils import build_module

    from stable_megatron.config import config_from_dict
    from stable_megatron.model.spec import layer_spec, transformer_config

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_attention_heads": 4,
                                      "init_std": 0.2, **model}})
    spec = layer_spec(cfg, torch.device("cpu")).submodules.self_attention
    torch.manual_seed(0)
    return build_module(spec, config=transformer_config(cfg), layer_number=1)


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("model", [
    {},
    {"softmax_cap": 2.0, "norm_placement": "qk_norm"},
    {"attention_backend": "flex", "norm_placement": "qkv_norm"},
    {"attention_backend": "math", "attention": "mlra"},
])
def test_capture_hook_sees_q_k_and_cap_and_changes_nothing(model):
    """With a hook set, the module's output and every gradient are bit-identical to the run
    without one; the hook gets the detached q and k the kernel took, the cap, the first head."""
    attn = _self_attention(model)
    x = torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(1))

    def run():
        attn.zero_grad()
        out, bias = attn(x)
        (out.square().sum() + bias.sum()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in attn.named_parameters()}

    plain, plain_grads = run()
    seen = []
    attn.set_capture_hook("test", seen.append)
    captured, captured_grads = run()
    attn.set_capture_hook("test", None)
    assert torch.equal(plain, captured)
    assert plain_grads.keys() == captured_grads.keys()
    assert all(torch.equal(plain_grads[n], captured_grads[n]) for n in plain_grads)
    assert len(seen) == 1
    capture = seen[0]
    assert capture.softmax_cap == model.get("softmax_cap") and capture.first_head == 0
    assert capture.q.shape == capture.k.shape == (2, 4, 12, 8)
    assert not capture.q.requires_grad and not capture.k.requires_grad
    with torch.no_grad():  # q and k as the kernel took them: its output from them and v
        qkv, _ = attn.linear_qkv(x)
        v = attn.v_layernorm(qkv.view(12, 2, 4, 3, 8)[..., 2, :]).permute(1, 2, 0, 3)
        context = attn.core_attention(capture.q, capture.k, v)
        out, _ = attn.linear_proj(context.permute(2, 0, 1, 3).reshape(12, 2, 32))
    assert torch.equal(out, plain)
    run()
    assert len(seen) == 1  # the hook is gone
    assert "core_attention" not in "".join(attn.state_dict())  # the kernel holds no state


# --------------------------------------------------------------------------------------------
# The math kernel's hand-written backward, and Flex's causal block mask


def _forward_backward(fn, q, k, v, seed: int = 7):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cap", [None, 2.0, 50.0])
@pytest.mark.parametrize("seq", [24, 37])
def test_math_kernel_is_bit_equal_to_the_autograd_definition(seq, cap, dtype):
    """In one block (the default) the math kernel runs `exact_attention`'s operations in its
    order, forward and backward: output and gradients are bit-identical."""
    from stable_megatron.model.attention import MathAttention, exact_attention

    q, k, v = (t.to(dtype) for t in qkv(seed=seq, scale=3.0, shape=(2, 3, seq, 16)))
    expected = _forward_backward(lambda *t: exact_attention(*t, cap), q, k, v)
    got = _forward_backward(MathAttention(softmax_cap=cap), q, k, v)
    for name, a, b in zip(["output", "grad q", "grad k", "grad v"], got, expected, strict=True):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("cap", [None, 50.0])
def test_math_kernel_in_row_blocks_matches_the_definition(monkeypatch, cap):
    """In blocks of query rows (each block against the keys it can see) the sums over keys
    skip the masked zeros and run in another order: equal to fp32 rounding. rtol 1e-5 is ~100
    ulps, for sums of up to 37 terms of either sign; atol 1e-5 for entries that cancel to ~0."""
    import stable_megatron.model.attention as attention

    q, k, v = qkv(seed=3, scale=3.0, shape=(2, 3, 37, 16))
    expected = _forward_backward(lambda *t: attention.exact_attention(*t, cap), q, k, v)
    monkeypatch.setattr(attention, "MATH_BLOCK_ROWS", 8)  # 4 full blocks and one of 5 rows
    got = _forward_backward(attention.MathAttention(softmax_cap=cap), q, k, v)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_math_kernel_without_grad_and_under_no_grad():
    from stable_megatron.model.attention import MathAttention, exact_attention

    q, k, v = qkv(scale=3.0)
    with torch.no_grad():
        assert torch.equal(MathAttention(softmax_cap=5.0)(q, k, v), exact_attention(q, k, v, 5.0))
    assert torch.equal(MathAttention(softmax_cap=5.0)(q, k, v), exact_attention(q, k, v, 5.0))


def test_flex_uses_one_cached_causal_block_mask():
    """The block mask skips the blocks above the diagonal (4 x 4 blocks of 128 at seq 512: 6
    of 16 skipped), is built once per (seq, device) and, on CPU (eager, forward only), gives the
    exact path's output."""
    from stable_megatron.model.attention import causal_block_mask

    cpu = torch.device("cpu")
    mask = causal_block_mask(512, cpu)
    assert causal_block_mask(512, cpu) is mask and causal_block_mask(256, cpu) is not mask
    blocks = mask.to_dense()[0, 0].bool()
    assert torch.equal(blocks, torch.ones(4, 4, dtype=torch.bool).tril())
    assert mask.sparsity() == pytest.approx(37.5)
    q, k, v = qkv(seed=2, scale=3.0, shape=(1, 2, 200, 16))  # one full block and a cut one
    torch.testing.assert_close(causal_attention(q, k, v, "flex", 2.0),
                               causal_attention(q, k, v, "math", 2.0), rtol=1e-5, atol=1e-6)
