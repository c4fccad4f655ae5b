"""Gated attention (head-wise, arXiv 2505.06708) against a direct computation from the module's
own weights, and against the ungated module when the gate is held open."""

from __future__ import annotations

import math

import pytest
import torch

from stable_megatron.model.attention import exact_attention


def _attention(model: dict, seed: int = 0):
    from megatron.core.transformer.spec_utils import build_module

    from stable_megatron.config import config_from_dict
    from stable_megatron.model.spec import layer_spec, transformer_config

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_attention_heads": 4,
                                      "init_std": 0.2, **model}})
    spec = layer_spec(cfg, torch.device("cpu")).submodules.self_attention
    torch.manual_seed(seed)
    return build_module(spec, config=transformer_config(cfg), layer_number=1)


@pytest.mark.parametrize("model", [{}, {"add_bias_linear": False},
                                   {"softmax_cap": 2.0, "attention": "mlra"}])
def test_output_is_each_heads_context_times_its_sigmoid_gate(world_of_one, model):
    attn = _attention({"attention_gate": True, **model})
    gate = attn.linear_gate
    assert gate.weight.shape == (4, 32)
    if gate.bias is not None:
        with torch.no_grad():
            gate.bias.normal_(0, 1.0)
    x = torch.randn(10, 2, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out, bias = attn(x)
    (out.square().sum()).backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0

    with torch.no_grad():
        qkv, _ = attn.linear_qkv(x)
        q, k, v = qkv.view(10, 2, 4, 3, 8).unbind(dim=3)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
        context = exact_attention(q, k, v, attn.softmax_cap)
        logits = x @ gate.weight.T + (gate.bias if gate.bias is not None else 0)  # [s, b, h]
        gated = context * torch.sigmoid(logits).permute(1, 2, 0)[..., None]
        expected, expected_bias = attn.linear_proj(gated.permute(2, 0, 1, 3).reshape(10, 2, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_an_open_gate_is_the_ungated_attention(world_of_one):
    """Gate weight 0 and bias 30: sigmoid = 1 to fp32 rounding, so the output is the plain
    module's with the same weights (the gate draws from a stream of its own: every other
    weight, and the RNG state after the module, equal the ungated module's)."""
    gated = _attention({"attention_gate": True})
    after_gated = torch.randn(3)
    plain = _attention({})
    assert torch.equal(torch.randn(3), after_gated)  # what is built next draws the same
    with torch.no_grad():
        gated.linear_gate.weight.zero_()
        gated.linear_gate.bias.fill_(30.0)
    assert math.isclose(torch.sigmoid(torch.tensor(30.0)).item(), 1.0)
    shared = {n: p for n, p in plain.named_parameters()}
    for name, param in gated.named_parameters():
        if not name.startswith("linear_gate"):
            assert torch.equal(param, shared[name]), name
    x = torch.randn(10, 2, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gated(x)[0], plain(x)[0], rtol=0, atol=0)


def test_parameter_count_formula_includes_the_gate():
    from stable_megatron.config import config_from_dict
    from stable_megatron.model.size import layer_params

    base = config_from_dict({"model": {"hidden_size": 64, "num_attention_heads": 8}}).model
    gated = config_from_dict({"model": {"hidden_size": 64, "num_attention_heads": 8,
                                        "attention_gate": True}}).model
    assert layer_params(gated) - layer_params(base) == 64 * 8 + 8
    assert layer_params(gated, tp=2) - layer_params(base, tp=2) == (64 * 8 + 8) // 2


def test_gpt2_export_refuses_the_gate():
    from stable_megatron.checkpoint.export import hf_gpt2_blockers
    from stable_megatron.config import config_from_dict

    blockers = hf_gpt2_blockers(config_from_dict({"model": {"attention_gate": True}}))
    assert blockers == ["model.attention_gate=true (GPT-2 has no gate on the attention output)"]
