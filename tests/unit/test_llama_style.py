"""Llama-style blocks: every norm is an RMSNorm, the MLP is SwiGLU (megatron-core's
gated_linear_unit with silu), checked against direct computations from the module's weights;
parameter counts and GPT-2 export's refusal."""

from __future__ import annotations

import pytest
import torch

LLAMA = {"normalization": "rmsnorm", "activation": "swiglu", "ffn_hidden_size": 48,
         "position_embedding": "rope", "tie_embeddings": False, "add_bias_linear": False}


def _layer(model: dict):
    from megatron.core.transformer.spec_utils import build_module

    from stable_megatron.config import config_from_dict
    from stable_megatron.model.spec import layer_spec, transformer_config

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_attention_heads": 4,
                                      "init_std": 0.2, **model}})
    torch.manual_seed(0)
    return build_module(layer_spec(cfg, torch.device("cpu")), config=transformer_config(cfg),
                        layer_number=1)


def _rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def test_mlp_is_swiglu_of_the_layers_weights(world_of_one):
    layer = _layer(LLAMA)
    mlp = layer.mlp
    w1 = mlp.linear_fc1.weight
    assert w1.shape == (2 * 48, 32) and mlp.linear_fc1.bias is None
    x = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, bias = mlp(x)
        gate, up = x @ w1[:48].T, x @ w1[48:].T
        expected = (torch.nn.functional.silu(gate) * up) @ mlp.linear_fc2.weight.T
    assert bias is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["pre_ln", "qk_fc_norm", "qkv_norm"])
def test_every_norm_is_an_rmsnorm(world_of_one, placement):
    from stable_megatron.model.layers import HeadLayerNorm

    layer = _layer({**LLAMA, "norm_placement": placement})
    norms = [m for m in layer.modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm, HeadLayerNorm))]
    assert norms and not any(isinstance(m, torch.nn.LayerNorm) for m in norms)
    for m in norms:
        if isinstance(m, HeadLayerNorm):
            assert m.rms and m.bias is None
            x = torch.randn(3, 8)
            with torch.no_grad():
                m.weight.normal_()
                torch.testing.assert_close(m(x), _rms(x, m.weight), rtol=1e-5, atol=1e-6)


def test_final_and_embedding_norms_follow_the_config(world_of_one):
    from stable_megatron.config import config_from_dict
    from stable_megatron.model.gpt import EmbeddingPipe, FinalNormPipe
    from stable_megatron.model.spec import transformer_config

    cfg = config_from_dict({"model": {**LLAMA, "embedding_norm": True, "vocab_size": 100,
                                      "hidden_size": 32, "num_attention_heads": 4}})
    assert isinstance(FinalNormPipe(cfg).norm, torch.nn.RMSNorm)
    emb = EmbeddingPipe(cfg, transformer_config(cfg), padded_vocab=128, seed=0)
    assert isinstance(emb.norm, torch.nn.RMSNorm)


def test_parameter_counts():
    from stable_megatron.config import config_from_dict
    from stable_megatron.model.size import layer_params

    m = config_from_dict({"model": {**LLAMA, "hidden_size": 32, "num_attention_heads": 4}}).model
    d, f = 32, 48
    # 2 RMSNorms (d each), QKV 3d^2, Proj d^2, FC1 2fd, FC2 fd; no biases
    assert layer_params(m) == 2 * d + 4 * d * d + 3 * f * d
    assert layer_params(m, tp=2) == 2 * d + (4 * d * d + 3 * f * d) // 2


def test_gpt2_export_refuses_llama_blocks():
    from stable_megatron.checkpoint.export import hf_gpt2_blockers
    from stable_megatron.config import config_from_dict

    blockers = " ".join(hf_gpt2_blockers(config_from_dict({"model": LLAMA})))
    assert "model.normalization=rmsnorm" in blockers and "model.activation=swiglu" in blockers
