"""Config -> megatron-core `TransformerConfig` and the `ModuleSpec` of one transformer layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from stable_megatron.config import Config
from stable_megatron.model.attention import SelfAttention, SelfAttentionSubmodules


def transformer_config(cfg: Config) -> TransformerConfig:
    """The megatron-core config for `cfg`. Fusions stay off: on CPU they trigger torch.compile,
    and the unfused paths are the ones every layout shares."""
    m = cfg.model
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.head_dim,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=m.add_bias_linear,
        init_method_std=m.init_std,
        activation_func=F.gelu,
        tensor_model_parallel_size=cfg.parallel.tp,
        # Weights are initialised whole on the CPU from a per-layer seed and then split, so the
        # same model comes out at every TP/PP layout.
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,  # the fused path writes main_grad, unread by DeepSpeed
        persist_layer_norm=False,
    )


def attention_backend(cfg: Config) -> str:
    backend = cfg.model.attention_backend
    return "sdpa" if backend == "auto" else backend


def layer_spec(cfg: Config) -> ModuleSpec:
    """One pre-LN GPT layer built from megatron-core parts and our attention module."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"backend": attention_backend(cfg)},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                params={"ffn_hidden_size": cfg.model.ffn_size},
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
