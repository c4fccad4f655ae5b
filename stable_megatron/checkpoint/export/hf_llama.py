"""The Hugging Face Llama format: a directory (config.json, model.safetensors, the tokenizer)
for `LlamaForCausalLM`, for the models Llama can express (`hf_llama_blockers` names what it
cannot)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stable_megatron import methods
from stable_megatron.checkpoint.export.common import (
    NotExpressibleError,
    _qkv_rows_to_blocks,
    _save_hf,
)
from stable_megatron.checkpoint.view import Checkpoint, merged_state_dict


def hf_llama_blockers(cfg) -> list[str]:
    """What keeps `cfg`'s model from being a Hugging Face Llama (empty: expressible). Llama:
    RMSNorm, a SwiGLU MLP, rotary positions, pre-norm blocks, standard attention; biases are
    allowed (Llama's `attention_bias`, `mlp_bias`), tied or untied output layer."""
    m = cfg.model
    wanted = [("normalization", "rmsnorm"), ("activation", "swiglu"),
              ("position_embedding", "rope")]
    blockers = [f"model.{key}={getattr(m, key)} (Llama: {value})" for key, value in wanted
                if getattr(m, key) != value]
    return blockers + methods.export_blockers(cfg, "hf_llama")


def hf_llama_state_dict(cfg, merged: dict[str, torch.Tensor], tp: int = 1
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json contents, LlamaForCausalLM state dict) for a merged state dict of `cfg`
    written at TP size `tp`. QKV rows per head [q_h; k_h; v_h] become q_proj, k_proj, v_proj
    (megatron-core's rotary embedding rotates halves, as Hugging Face's Llama does, so no
    permutation is needed); FC1 [gate; up] becomes gate_proj and up_proj. The vocabulary stays
    padded as trained."""
    blockers = hf_llama_blockers(cfg)
    if blockers:
        raise NotExpressibleError("not expressible as Hugging Face Llama: " + "; ".join(blockers))
    m = cfg.model
    d, heads, layers, f = m.hidden_size, m.num_attention_heads, m.num_layers, m.ffn_size
    vocab = m.padded_vocab_size(tp)
    out = {"model.embed_tokens.weight": merged["0.word_embeddings.weight"]}
    for i in range(1, layers + 1):
        src, dst = f"{i}.layer.", f"model.layers.{i - 1}."
        attn, mlp = src + "self_attention.", src + "mlp."
        qkv = _qkv_rows_to_blocks(merged[attn + "linear_qkv.weight"], heads)
        fc1 = merged[mlp + "linear_fc1.weight"]
        out.update({
            dst + "input_layernorm.weight": merged[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": qkv[:d],
            dst + "self_attn.k_proj.weight": qkv[d:2 * d],
            dst + "self_attn.v_proj.weight": qkv[2 * d:],
            dst + "self_attn.o_proj.weight": merged[attn + "linear_proj.weight"],
            dst + "post_attention_layernorm.weight": merged[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": fc1[:f],
            dst + "mlp.up_proj.weight": fc1[f:],
            dst + "mlp.down_proj.weight": merged[mlp + "linear_fc2.weight"],
        })
        if m.add_bias_linear:
            qkv_bias = _qkv_rows_to_blocks(merged[attn + "linear_qkv.bias"], heads)
            fc1_bias = merged[mlp + "linear_fc1.bias"]
            out.update({
                dst + "self_attn.q_proj.bias": qkv_bias[:d],
                dst + "self_attn.k_proj.bias": qkv_bias[d:2 * d],
                dst + "self_attn.v_proj.bias": qkv_bias[2 * d:],
                dst + "self_attn.o_proj.bias": merged[attn + "linear_proj.bias"],
                dst + "mlp.gate_proj.bias": fc1_bias[:f],
                dst + "mlp.up_proj.bias": fc1_bias[f:],
                dst + "mlp.down_proj.bias": merged[mlp + "linear_fc2.bias"],
            })
    out["model.norm.weight"] = merged[f"{layers + 1}.norm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = merged[f"{layers + 2}.output_layer.weight"]
    dtype = merged["0.word_embeddings.weight"].dtype
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.layernorm_epsilon,
        "rope_theta": m.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "attention_bias": m.add_bias_linear,
        "mlp_bias": m.add_bias_linear,
        "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    return config, {k: v.contiguous() for k, v in out.items()}


def export_hf_llama(ckpt: Checkpoint, out_dir: str | os.PathLike,
                    tokenizer: str | os.PathLike | None = None) -> Path:
    """A Hugging Face Llama directory (config.json + model.safetensors + the run's tokenizer)
    for a Llama-style model; `NotExpressibleError` naming the config fields otherwise (checked
    before any tensor is read)."""
    blockers = hf_llama_blockers(ckpt.config)
    if blockers:
        raise NotExpressibleError("not expressible as Hugging Face Llama: " + "; ".join(blockers))
    config, tensors = hf_llama_state_dict(ckpt.config, merged_state_dict(ckpt), ckpt.tp)
    return _save_hf(ckpt, Path(out_dir), config, tensors, tokenizer)
