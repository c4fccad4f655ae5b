"""Checkpoint export: the writers of a checkpoint's merged weights, over the read-only view of
`checkpoint/view.py` (whose names are re-exported here for the callers of this module):

- `export_safetensors`: the full state dict as one safetensors file with the config and the
  checkpoint's provenance in its metadata (`read_safetensors` reads it back);
- `export_hf_gpt2`: a Hugging Face GPT-2 directory with the tokenizer, for models GPT-2 can
  express (`hf_gpt2_blockers` names what it cannot);
- `export_hf_llama`: a Hugging Face Llama directory, likewise (`hf_llama_blockers`).

A model a format cannot express is refused with `NotExpressibleError`, naming the config fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from stable_megatron.checkpoint.format import CheckpointError
from stable_megatron.checkpoint.view import (  # noqa: F401  (re-exported: the view's API)
    Checkpoint,
    TensorInfo,
    format_summary,
    load_into_model,
    merged_state_dict,
    open_checkpoint,
    read_tensors,
    summary,
    tokenizer_model_of,
)


class NotExpressibleError(CheckpointError):
    """The model cannot be written in the requested format; the message names the config fields."""


# --------------------------------------------------------------------------------------------
# Export: safetensors


def _write_tokenizer(cfg, out: Path, tokenizer: str | os.PathLike | None) -> dict[str, int]:
    """The run's tokenizer as Hugging Face files in `out` (`hf_tokenizer`); its special ids."""
    from stable_megatron.checkpoint.hf_tokenizer import write_hf_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    return write_hf_tokenizer(tokenizer_model_of(cfg, tokenizer), out, cfg.model.seq_length)


def _provenance(ckpt: Checkpoint) -> dict[str, Any]:
    return {"source": str(ckpt.tag_dir.resolve()), "tag": ckpt.tag_dir.name, "step": ckpt.step,
            "consumed_samples": ckpt.consumed_samples, "layout": ckpt.layout,
            "code_version": ckpt.meta.get("code_version")}


def _save_safetensors(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]
                      ) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)


def export_safetensors(ckpt: Checkpoint, out: str | os.PathLike) -> Path:
    """The full merged state dict as one safetensors file; its metadata holds the config
    (`stable_megatron.config`, JSON) and where the weights came from
    (`stable_megatron.checkpoint`, JSON: source, tag, step, consumed samples, layout)."""
    out = Path(out)
    tensors = merged_state_dict(ckpt)
    metadata = {
        "format": "pt",
        "stable_megatron.config": json.dumps(ckpt.config.to_dict()),
        "stable_megatron.checkpoint": json.dumps(_provenance(ckpt)),
        "stable_megatron.names": "<PipelineModule block index>.<state_dict key of the block>, "
                                 "full tensors (tensor-parallel shards merged)",
    }
    _save_safetensors(tensors, out, metadata)
    return out


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, {"config": dict, "checkpoint": dict}) of a file `export_safetensors` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, {"config": json.loads(meta.get("stable_megatron.config", "null")),
                     "checkpoint": json.loads(meta.get("stable_megatron.checkpoint", "null"))}


# --------------------------------------------------------------------------------------------
# Export: Hugging Face GPT-2


def hf_gpt2_blockers(cfg) -> list[str]:
    """The config fields that keep this model from being a Hugging Face GPT-2 (empty: it is).

    GPT-2 is our baseline: learned absolute positions, pre-LN LayerNorm (weight and bias, any
    eps), standard multi-head attention scaled by 1/sqrt(d_head), exact-erf GELU MLP of any
    width, linear biases (a model without them is written with zero biases), tied or untied
    output layer."""
    m = cfg.model
    blockers = []
    if m.position_embedding != "learned":
        blockers.append(f"model.position_embedding={m.position_embedding} (GPT-2 has learned "
                        f"absolute positions)")
    if m.attention != "standard":
        blockers.append(f"model.attention={m.attention} (GPT-2 has full-rank QKV and output "
                        f"projections)")
    if m.norm_placement != "pre_ln":
        blockers.append(f"model.norm_placement={m.norm_placement} (GPT-2 has pre-LN only, no "
                        f"QK/V/Proj/FC2 norms)")
    if m.softmax_cap is not None:
        blockers.append(f"model.softmax_cap={m.softmax_cap} (GPT-2 has no attention logit cap)")
    if m.sigma_reparam.enabled:
        blockers.append("model.sigma_reparam.enabled=true (GPT-2 has plain linear weights; "
                        "export --format safetensors keeps gamma, u and v)")
    if m.embedding_norm:
        blockers.append("model.embedding_norm=true (GPT-2 has no LayerNorm after the embedding)")
    if m.scale_embeddings:
        blockers.append("model.scale_embeddings=true (GPT-2 does not scale its embeddings)")
    if m.normalization != "layernorm":
        blockers.append(f"model.normalization={m.normalization} (GPT-2 has LayerNorm)")
    if m.activation != "gelu":
        blockers.append(f"model.activation={m.activation} (GPT-2 has a GELU MLP)")
    if m.attention_gate:
        blockers.append("model.attention_gate=true (GPT-2 has no gate on the attention output)")
    return blockers


def _qkv_rows_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """linear_qkv's output rows, per head `[q_h; k_h; v_h]`, reordered to `[q | k | v]` with
    the heads in order inside each block (GPT-2's c_attn columns)."""
    rest = t.shape[1:]
    per = t.reshape(heads, 3, t.shape[0] // (3 * heads), *rest)
    return per.transpose(0, 1).reshape(t.shape)


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


def _save_hf(ckpt: Checkpoint, out: Path, config: dict, tensors: dict[str, torch.Tensor],
             tokenizer: str | os.PathLike | None) -> Path:
    config["stable_megatron"] = _provenance(ckpt)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    config.update(_write_tokenizer(ckpt.config, out, tokenizer))
    _save_safetensors(tensors, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def hf_llama_blockers(cfg) -> list[str]:
    """What keeps `cfg`'s model from being a Hugging Face Llama (empty: expressible). Llama:
    RMSNorm, a SwiGLU MLP, rotary positions, pre-norm blocks, standard attention; biases are
    allowed (Llama's `attention_bias`, `mlp_bias`), tied or untied output layer."""
    m = cfg.model
    wanted = [("normalization", "rmsnorm"), ("activation", "swiglu"),
              ("position_embedding", "rope"), ("norm_placement", "pre_ln"),
              ("attention", "standard")]
    blockers = [f"model.{key}={getattr(m, key)} (Llama: {value})" for key, value in wanted
                if getattr(m, key) != value]
    if m.softmax_cap is not None:
        blockers.append(f"model.softmax_cap={m.softmax_cap} (Llama has no logit cap)")
    if m.sigma_reparam.enabled:
        blockers.append("model.sigma_reparam.enabled=true (Llama has plain linear weights)")
    if m.attention_gate:
        blockers.append("model.attention_gate=true (Llama has no attention output gate)")
    if m.embedding_norm or m.scale_embeddings:
        blockers.append("model.embedding_norm / model.scale_embeddings (Llama has neither)")
    return blockers


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
