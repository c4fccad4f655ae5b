"""MLRA modules (single process, TP=1): outputs against an explicit per-head reference built from
the factors, the [q_h; k_h; v_h] layout, parameter counts against the formula, init stds,
gradient flow and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*tp_group is None:DeprecationWarning"),
    pytest.mark.usefixtures("world_of_one"),  # tests/conftest.py
]

D_MODEL, HEADS, D_HEAD, LAYERS = 32, 4, 8, 3
SEQ, BATCH = 5, 2




def tconfig(bias: bool = True, init_std: float = 0.02, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=kw.pop("hidden_size", D_MODEL),
        num_attention_heads=kw.pop("heads", HEADS),
        kv_channels=kw.pop("d_head", D_HEAD),
        add_bias_linear=bias,
        init_method_std=init_std,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        **kw,
    )


def build_slots(cfg, targets, rank, seed: int = 0, factor_init: str = "balanced"):
    """(linear_qkv, linear_proj) built the way our SelfAttention builds its slots."""
    from megatron.core.transformer.spec_utils import build_module

    from stable_megatron.model.mlra import mlra_linear_specs

    qkv_spec, proj_spec = mlra_linear_specs(rank, targets, factor_init)
    width = cfg.num_attention_heads * cfg.kv_channels
    torch.manual_seed(seed)
    qkv = build_module(
        qkv_spec, cfg.hidden_size, 3 * width, config=cfg, init_method=cfg.init_method,
        gather_output=False, bias=cfg.add_bias_linear, skip_bias_add=False, is_expert=False,
    )
    proj = build_module(
        proj_spec, width, cfg.hidden_size, config=cfg,
        init_method=cfg.output_layer_init_method, bias=cfg.add_bias_linear,
        input_is_parallel=True, skip_bias_add=True, is_expert=False,
    )
    return qkv, proj


def randomise_(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero biases etc., so that a wrong bias layout shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def reference_qkv(m, x: torch.Tensor) -> torch.Tensor:
    """x @ A_t,h @ B_t,h (or x @ W_t,h for full-rank targets) head by head, from the factors,
    laid out [q_0; k_0; v_0; q_1; ...]."""
    r = m.rank
    low, full = m.lowrank_targets, m.full_targets
    pieces = []
    for h in range(HEADS):
        for j, t in enumerate("qkv"):
            if t in low:
                i = low.index(t)
                a_rows = m.lowrank_a.weight[(h * len(low) + i) * r : (h * len(low) + i + 1) * r]
                y = x @ a_rows.T @ m.lowrank_b[h, i]
            else:
                i = full.index(t)
                w_rows = m.full.weight[(h * len(full) + i) * D_HEAD : (h * len(full) + i + 1)
                                       * D_HEAD]
                y = x @ w_rows.T
            if m.bias is not None:
                y = y + m.bias[(3 * h + j) * D_HEAD : (3 * h + j + 1) * D_HEAD]
            pieces.append(y)
    return torch.cat(pieces, dim=-1)


def reference_proj(m, context: torch.Tensor) -> torch.Tensor:
    r = m.rank
    out = 0
    for h in range(HEADS):
        ctx_h = context[..., h * D_HEAD : (h + 1) * D_HEAD]
        out = out + ctx_h @ m.lowrank_b[h] @ m.weight[:, h * r : (h + 1) * r].T
    return out


QKV_CASES = [(["q", "k", "v"], None), (["q", "v"], 3), (["k", "o"], 5), (["v"], 1)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("targets,rank", QKV_CASES)
def test_qkv_matches_per_head_reference(targets, rank, bias):
    from stable_megatron.model.mlra import MLRAQKV

    qkv, _ = build_slots(tconfig(bias), targets, rank)
    assert isinstance(qkv, MLRAQKV)
    randomise_(qkv)
    x = torch.randn(SEQ, BATCH, D_MODEL)
    out, out_bias = qkv(x)
    assert out_bias is None and out.shape == (SEQ, BATCH, HEADS * 3 * D_HEAD)
    with torch.no_grad():
        torch.testing.assert_close(out, reference_qkv(qkv, x), rtol=1e-5, atol=1e-6)


def test_qkv_skip_bias_add_returns_the_bias():
    qkv, _ = build_slots(tconfig(True), ["q", "k", "v"], 2)
    randomise_(qkv)
    qkv.skip_bias_add = True
    x = torch.randn(SEQ, BATCH, D_MODEL)
    out, bias = qkv(x)
    assert bias is qkv.bias
    with torch.no_grad():
        torch.testing.assert_close(out + bias, reference_qkv(qkv, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [None, 3])
def test_proj_matches_per_head_reference_and_skips_bias(rank):
    from stable_megatron.model.mlra import MLRAProj

    _, proj = build_slots(tconfig(True), ["o"], rank)
    assert isinstance(proj, MLRAProj)
    randomise_(proj)
    context = torch.randn(SEQ, BATCH, HEADS * D_HEAD)
    out, bias = proj(context)
    assert bias is proj.bias and out.shape == (SEQ, BATCH, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(out, reference_proj(proj, context), rtol=1e-5, atol=1e-6)
    proj.skip_bias_add = False
    out2, none = proj(context)
    assert none is None
    with torch.no_grad():
        torch.testing.assert_close(out2, out + proj.bias, rtol=1e-6, atol=1e-7)


def test_full_rank_factorisation_represents_a_standard_qkv():
    """With r = d_head, A = W (per head) and B = I the module is a plain per-head QKV linear."""
    qkv, proj = build_slots(tconfig(True), ["q", "k", "v", "o"], D_HEAD)
    w_qkv = torch.randn(HEADS * 3 * D_HEAD, D_MODEL)
    w_proj = torch.randn(D_MODEL, HEADS * D_HEAD)
    b_qkv = torch.randn(HEADS * 3 * D_HEAD)
    with torch.no_grad():
        qkv.lowrank_a.weight.copy_(w_qkv)
        qkv.lowrank_b.copy_(torch.eye(D_HEAD).expand(HEADS, 3, D_HEAD, D_HEAD))
        qkv.bias.copy_(b_qkv)
        proj.weight.copy_(w_proj)
        proj.lowrank_b.copy_(torch.eye(D_HEAD).expand(HEADS, D_HEAD, D_HEAD))
        x = torch.randn(SEQ, BATCH, D_MODEL)
        context = torch.randn(SEQ, BATCH, HEADS * D_HEAD)
        torch.testing.assert_close(qkv(x)[0], F.linear(x, w_qkv, b_qkv), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(proj(context)[0], F.linear(context, w_proj), rtol=1e-5,
                                   atol=1e-5)


def count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "targets,rank",
    [(["q", "k", "v"], None), (["q", "k", "v", "o"], 3), (["k"], 5), (["o"], 2),
     (["q", "v", "o"], D_HEAD), (["q", "k", "v", "o"], 1)],
)
def test_parameter_count_matches_formula(targets, rank, bias):
    from stable_megatron.model.mlra import mlra_parameter_count

    qkv, proj = build_slots(tconfig(bias), targets, rank)
    assert count(qkv, proj) == mlra_parameter_count(D_MODEL, HEADS, D_HEAD, rank, targets, bias)


def test_parameter_count_by_hand():
    from stable_megatron.model.mlra import (
        mlra_parameter_count,
        standard_attention_parameter_count,
    )

    # d=64, H=4, d_head=16, r=8: per head and low-rank target 8 * (64 + 16) = 640.
    assert mlra_parameter_count(64, 4, 16, None, ["q", "k", "v"], True) == (
        3 * 4 * 640 + 3 * 64 + 64 * 64 + 64
    )
    assert mlra_parameter_count(64, 4, 16, 8, ["q", "k", "v", "o"], False) == 4 * 4 * 640
    assert standard_attention_parameter_count(64, 4, 16, True) == 4 * 64 * 64 + 3 * 64 + 64
    assert mlra_parameter_count(64, 4, 16, 16, ["k"], False) == 4 * 64 * 64 + 4 * 16 * 16


@pytest.mark.parametrize("bias", [True, False])
def test_standard_count_matches_megatron_linears(bias):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module

    from stable_megatron.model.mlra import MLRAQKV, standard_attention_parameter_count

    cfg = tconfig(bias)
    qkv_mlra, proj = build_slots(cfg, ["q"], None)  # no "o": the standard proj slot
    assert type(qkv_mlra) is MLRAQKV and type(proj) is RowParallelLinear
    qkv = build_module(
        ColumnParallelLinear, D_MODEL, 3 * HEADS * D_HEAD, config=cfg,
        init_method=cfg.init_method, gather_output=False, bias=bias,
    )
    assert count(qkv, proj) == standard_attention_parameter_count(D_MODEL, HEADS, D_HEAD, bias)


@pytest.mark.parametrize("factor_init", ["balanced", "input_side"])
def test_init_product_has_the_full_rank_std(factor_init):
    """Every factor is N(0, s) with s_1 s_2 sqrt(r) = std, so W = A B has entries of std
    `std` (0.02 for QKV, the depth-scaled std for Proj)."""
    from stable_megatron.model.mlra import factor_stds

    d_model, heads, d_head, r = 256, 4, 64, 32
    cfg = tconfig(True, hidden_size=d_model, heads=heads, d_head=d_head)
    qkv, proj = build_slots(cfg, ["q", "k", "v", "o"], r, factor_init=factor_init)
    s1, s2 = factor_stds(0.02, r, factor_init)
    assert s1 * s2 * math.sqrt(r) == pytest.approx(0.02)
    assert qkv.lowrank_a.weight.std().item() == pytest.approx(s1, rel=0.02)
    assert qkv.lowrank_b.std().item() == pytest.approx(s2, rel=0.02)
    a = qkv.lowrank_a.weight.detach().view(heads, 3, r, d_model)
    w = torch.einsum("htrd,htre->htde", a, qkv.lowrank_b.detach())
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(qkv.bias == 0) and torch.all(proj.bias == 0)
    proj_std = 0.02 / math.sqrt(2 * LAYERS)
    w_o = torch.einsum(
        "hdr,ohr->hdo", proj.lowrank_b.detach(), proj.weight.detach().view(d_model, heads, r)
    )
    assert w_o.std().item() == pytest.approx(proj_std, rel=0.05)


def test_paper_init_shrinks_the_product_std():
    """"paper": both factors at the layer's std s, so W = A B has entries of std s^2 sqrt(r)."""
    d_model, heads, d_head, r = 256, 4, 64, 32
    cfg = tconfig(True, hidden_size=d_model, heads=heads, d_head=d_head)
    qkv, _ = build_slots(cfg, ["q", "k", "v", "o"], r, factor_init="paper")
    assert qkv.lowrank_a.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert qkv.lowrank_b.std().item() == pytest.approx(0.02, rel=0.02)
    a = qkv.lowrank_a.weight.detach().view(heads, 3, r, d_model)
    w = torch.einsum("htrd,htre->htde", a, qkv.lowrank_b.detach())
    assert w.std().item() == pytest.approx(0.02**2 * math.sqrt(r), rel=0.05)


def test_init_is_seeded_and_factor_stds_differ_by_mode():
    cfg = tconfig(True)
    a1, p1 = build_slots(cfg, ["q", "k", "v", "o"], 3, seed=7)
    a2, p2 = build_slots(cfg, ["q", "k", "v", "o"], 3, seed=7)
    a3, _ = build_slots(cfg, ["q", "k", "v", "o"], 3, seed=8)
    for x, y in zip([*a1.parameters(), *p1.parameters()], [*a2.parameters(), *p2.parameters()],
                    strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a1.lowrank_b, a3.lowrank_b)


def test_gradients_reach_every_factor():
    cfg = tconfig(True)
    qkv, proj = build_slots(cfg, ["q", "v", "o"], 3)
    x = torch.randn(SEQ, BATCH, D_MODEL, requires_grad=True)
    out, _ = qkv(x)
    q, k, v = out.view(SEQ, BATCH, HEADS, 3, D_HEAD).unbind(dim=3)
    y, bias = proj((q * k + v).reshape(SEQ, BATCH, HEADS * D_HEAD))
    ((y + bias) ** 2).sum().backward()
    grads = {name: p.grad for name, p in [*qkv.named_parameters(prefix="qkv"),
                                          *proj.named_parameters(prefix="proj")]}
    assert set(grads) == {"qkv.lowrank_b", "qkv.bias", "qkv.lowrank_a.weight",
                          "qkv.full.weight", "proj.weight", "proj.bias", "proj.lowrank_b"}
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_tensor_parallel_attributes():
    qkv, proj = build_slots(tconfig(True), ["q", "k", "v", "o"], 3)
    for p in (qkv.lowrank_b, qkv.bias, qkv.lowrank_a.weight, proj.lowrank_b):
        assert p.tensor_model_parallel and p.partition_dim == 0
    assert proj.weight.tensor_model_parallel and proj.weight.partition_dim == 1
    assert not getattr(proj.bias, "tensor_model_parallel", False)


def test_argument_errors():
    from stable_megatron.model.mlra import MLRAQKV, factor_stds, mlra_linear_specs

    cfg = tconfig(True)
    with pytest.raises(ValueError, match="each of q, k, v, o at most once"):
        mlra_linear_specs(None, ["q", "x"])
    with pytest.raises(ValueError, match="at most once"):
        mlra_linear_specs(None, ["q", "q"])
    with pytest.raises(ValueError, match="must be >= 1"):
        MLRAQKV(D_MODEL, 3 * HEADS * D_HEAD, config=cfg, init_method=cfg.init_method, rank=0)
    with pytest.raises(ValueError, match="output_size"):
        MLRAQKV(D_MODEL, 2 * HEADS * D_HEAD, config=cfg, init_method=cfg.init_method)
    with pytest.raises(ValueError, match="init_std"):
        MLRAQKV(D_MODEL, 3 * HEADS * D_HEAD, config=cfg, init_method=torch.nn.init.zeros_)
    m = MLRAQKV(D_MODEL, 3 * HEADS * D_HEAD, config=cfg, init_method=torch.nn.init.zeros_,
                init_std=0.1, rank=4)
    assert m.lowrank_a.weight.std().item() == pytest.approx(factor_stds(0.1, 4)[0], rel=0.2)
    with pytest.raises(ValueError, match="factor_init"):
        factor_stds(0.02, 4, "wide")
