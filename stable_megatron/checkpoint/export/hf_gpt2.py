"""The Hugging Face GPT-2 format: a directory (config.json, model.safetensors, the tokenizer)
for `AutoModelForCausalLM`, for the models GPT-2 can express (`hf_gpt2_blockers` names what
it cannot)."""

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


def hf_gpt2_blockers(cfg) -> list[str]:
    """The config fields that keep this model from being a Hugging Face GPT-2 (empty: it is).

    GPT-2 is our baseline: learned absolute positions, pre-LN LayerNorm (weight and bias, any
    eps), standard multi-head attention scaled by 1/sqrt(d_head), exact-erf GELU MLP of any
    width, linear biases (a model without them is written with zero biases), tied or untied
    output layer. Every enabled stability method is asked what it blocks
    (`Method.export_blockers`)."""
    m = cfg.model
    blockers = []
    if m.position_embedding != "learned":
        blockers.append(f"model.position_embedding={m.position_embedding} (GPT-2 has learned "
                        f"absolute positions)")
    if m.normalization != "layernorm":
        blockers.append(f"model.normalization={m.normalization} (GPT-2 has LayerNorm)")
    if m.activation != "gelu":
        blockers.append(f"model.activation={m.activation} (GPT-2 has a GELU MLP)")
    return blockers + methods.export_blockers(cfg, "hf_gpt2")


def hf_gpt2_state_dict(cfg, merged: dict[str, torch.Tensor], tp: int = 1,
                       trim_vocab: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json contents, GPT2LMHeadModel state dict) for a merged state dict of `cfg`
    written at TP size `tp` (which sets the vocabulary padding). The padded vocabulary rows are
    kept unless `trim_vocab` (the logits of real tokens are the same either way; the padding
    rows take part in the training softmax)."""
    blockers = hf_gpt2_blockers(cfg)
    if blockers:
        raise NotExpressibleError("not expressible as Hugging Face GPT-2: " + "; ".join(blockers))
    m = cfg.model
    d, heads, layers = m.hidden_size, m.num_attention_heads, m.num_layers
    vocab = m.vocab_size if trim_vocab else m.padded_vocab_size(tp)
    dtype = merged["0.word_embeddings.weight"].dtype

    def bias(name: str, size: int) -> torch.Tensor:
        return merged[name] if name in merged else torch.zeros(size, dtype=dtype)

    out = {
        "transformer.wte.weight": merged["0.word_embeddings.weight"][:vocab],
        "transformer.wpe.weight": merged["0.position_embeddings.weight"],
    }
    for i in range(1, layers + 1):
        src, dst = f"{i}.layer.", f"transformer.h.{i - 1}."
        attn, mlp = src + "self_attention.", src + "mlp."
        out.update({
            dst + "ln_1.weight": merged[src + "input_layernorm.weight"],
            dst + "ln_1.bias": merged[src + "input_layernorm.bias"],
            dst + "attn.c_attn.weight": _qkv_rows_to_blocks(
                merged[attn + "linear_qkv.weight"], heads).t(),
            dst + "attn.c_attn.bias": _qkv_rows_to_blocks(
                bias(attn + "linear_qkv.bias", 3 * d), heads),
            dst + "attn.c_proj.weight": merged[attn + "linear_proj.weight"].t(),
            dst + "attn.c_proj.bias": bias(attn + "linear_proj.bias", d),
            dst + "ln_2.weight": merged[src + "pre_mlp_layernorm.weight"],
            dst + "ln_2.bias": merged[src + "pre_mlp_layernorm.bias"],
            dst + "mlp.c_fc.weight": merged[mlp + "linear_fc1.weight"].t(),
            dst + "mlp.c_fc.bias": bias(mlp + "linear_fc1.bias", m.ffn_size),
            dst + "mlp.c_proj.weight": merged[mlp + "linear_fc2.weight"].t(),
            dst + "mlp.c_proj.bias": bias(mlp + "linear_fc2.bias", d),
        })
    out["transformer.ln_f.weight"] = merged[f"{layers + 1}.norm.weight"]
    out["transformer.ln_f.bias"] = merged[f"{layers + 1}.norm.bias"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = merged[f"{layers + 2}.output_layer.weight"][:vocab]
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": m.seq_length,
        "n_embd": d,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": m.ffn_size,
        "activation_function": "gelu",  # torch's exact (erf) GELU, as megatron-core's MLP here
        "resid_pdrop": m.hidden_dropout,
        "embd_pdrop": m.hidden_dropout,
        "attn_pdrop": m.attention_dropout,
        "layer_norm_epsilon": m.layernorm_epsilon,
        "initializer_range": m.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    return config, {k: v.contiguous() for k, v in out.items()}


def export_hf_gpt2(ckpt: Checkpoint, out_dir: str | os.PathLike, trim_vocab: bool = False,
                   tokenizer: str | os.PathLike | None = None) -> Path:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors + the run's tokenizer)
    for a baseline model; `NotExpressibleError` naming the config fields otherwise (checked
    before any tensor is read)."""
    blockers = hf_gpt2_blockers(ckpt.config)
    if blockers:
        raise NotExpressibleError("not expressible as Hugging Face GPT-2: " + "; ".join(blockers))
    out = Path(out_dir)
    config, tensors = hf_gpt2_state_dict(ckpt.config, merged_state_dict(ckpt), ckpt.tp,
                                         trim_vocab)
    return _save_hf(ckpt, out, config, tensors, tokenizer)
