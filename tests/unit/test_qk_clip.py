"""QK-clip's pieces against direct computations: the per-head maximum logit, the factors, and
the scaling of each QKV layout (standard, MLRA with low-rank and full-rank targets)."""

from __future__ import annotations

import math

import pytest
import torch

from stable_megatron.config import ConfigError, config_from_dict, validate
from stable_megatron.model.attention import causal_logits
from stable_megatron.model.qk_clip import clip_factors, head_max_logits, query_key_scales


def test_head_max_logits_is_the_largest_visible_logit_of_each_head():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 20, 8, generator=g)
    q[1, 2, 0] = 10.0  # the first query with a late key: a huge logit the mask hides
    k[1, 2, -1] = 10.0
    expected = causal_logits(q, k).amax(dim=(0, 2, 3))
    assert causal_logits(q, k)[1, 2, 0, -1] == -math.inf
    for rows in (1, 7, 20, 128):
        torch.testing.assert_close(head_max_logits(q, k, block_rows=rows), expected,
                                   rtol=1e-6, atol=0)
    raw = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    assert raw[1, 2].max() > expected[2] + 10  # the hidden pair would have won


def test_factors_clip_above_tau_only_and_never_make_nan():
    m = torch.tensor([400.0, 100.0, 99.0, 0.0, -5.0, -math.inf, math.nan, 101.0])
    factors = clip_factors(m, 100.0)
    assert torch.isfinite(factors).all()
    expected = torch.tensor([0.5, 1, 1, 1, 1, 1, 1, math.sqrt(100 / 101)])
    torch.testing.assert_close(factors, expected, rtol=1e-7, atol=0)
    assert (factors[1:7] == 1).all()  # exactly 1: those heads' weights stay bit-identical


LAYOUTS = {
    "standard": {},
    "standard_no_bias": {"add_bias_linear": False},
    "mlra_q_low_k_full": {"attention": "mlra", "mlra": {"targets": ["q", "v"], "rank": 2}},
    "mlra_qkvo": {"attention": "mlra", "mlra": {"targets": ["q", "k", "v", "o"], "rank": 3}},
}


def _attention(model: dict):
    from megatron.core.transformer.spec_utils import build_module

    from stable_megatron.model.spec import layer_spec, transformer_config

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_attention_heads": 4,
                                      "init_std": 0.2, **model}})
    spec = layer_spec(cfg, torch.device("cpu")).submodules.self_attention
    torch.manual_seed(0)
    attn = build_module(spec, config=transformer_config(cfg), layer_number=1)
    with torch.no_grad():  # non-zero biases, so that a bias left unscaled would show
        for name, param in attn.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return attn


def _qkv(attn, x):
    seen = []
    attn.set_capture_hook("test", seen.append)
    with torch.no_grad():
        attn(x)
        qkv, _ = attn.linear_qkv(x)
    attn.set_capture_hook("test", None)
    heads, d = attn.heads_local, attn.head_dim
    v = qkv.view(*x.shape[:2], heads, 3, d)[..., 2, :]
    return seen[0].q, seen[0].k, v


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scaling_bounds_the_clipped_heads_and_leaves_the_rest(world_of_one, layout):
    """With tau between the heads' maxima: the clipped heads' q and k are scaled by their
    factor and their largest logit becomes tau; v, the other heads' q and k, and every entry
    the scales leave at 1 are bit-identical; no parameter outside the returned ones changes."""
    attn = _attention(LAYOUTS[layout])
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(1))
    q, k, v = _qkv(attn, x)
    maxima = head_max_logits(q, k)
    tau = float(maxima.median())
    factors = clip_factors(maxima, tau)
    clipped = factors < 1
    assert clipped.any() and not clipped.all()
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    scales = query_key_scales(attn, factors)
    scaled_ids = {id(p) for p, _ in scales}
    with torch.no_grad():
        for param, scale in scales:
            assert scale.shape == param.shape
            param.mul_(scale)
    names = {id(p): n for n, p in attn.named_parameters()}
    for param, scale in scales:
        old = before[names[id(param)]]
        assert torch.equal(param[scale == 1], old[scale == 1])
        assert torch.equal(param, old * scale)
    for name, param in attn.named_parameters():
        if id(param) not in scaled_ids:
            assert torch.equal(param, before[name]), name
    q2, k2, v2 = _qkv(attn, x)
    torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-7)
    f = factors.view(1, -1, 1, 1)
    torch.testing.assert_close(q2, q * f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k2, k * f, rtol=1e-5, atol=1e-6)
    after = head_max_logits(q2, k2)
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(after[~clipped], maxima[~clipped], rtol=1e-6, atol=0)


@pytest.mark.parametrize("model, match", [
    ({"qk_clip": {"enabled": True, "tau": 0.0}}, "tau"),
    ({"qk_clip": {"enabled": False, "tau": math.inf}}, "tau"),
    ({"qk_clip": {"enabled": True}, "norm_placement": "qk_norm"}, "norm_placement=qk_norm"),
    ({"qk_clip": {"enabled": True}, "norm_placement": "qkv_norm"}, "norm_placement=qkv_norm"),
    ({"qk_clip": {"enabled": True}, "sigma_reparam": {"enabled": True}}, "sigma-reparam"),
])
def test_bad_combinations_are_refused(model, match):
    cfg = config_from_dict({"model": model})
    with pytest.raises(ConfigError, match=match):
        validate(cfg, 1)


def test_allowed_combinations(tmp_path):
    for model in ({"qk_clip": {"enabled": True}},
                  {"qk_clip": {"enabled": True}, "softmax_cap": 30.0},
                  {"qk_clip": {"enabled": True}, "attention": "mlra"},
                  {"qk_clip": {"enabled": True},
                   "sigma_reparam": {"enabled": True, "targets": ["proj", "fc1", "fc2"]}}):
        validate(config_from_dict({"model": model}), 1)
