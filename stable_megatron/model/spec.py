"""Config -> megatron-core `TransformerConfig` and the `ModuleSpec` of one transformer layer.

The plain pre-LN layer is written here; each enabled stability method then edits its slots
(`Method.edit_layer`, stable_megatron/methods/), and the attention kernel goes in the
`core_attention` slot (`core_attention_spec`; what each kernel supports is declared on its class
in `model/attention.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from stable_megatron import methods
from stable_megatron.config import Config
from stable_megatron.methods import LayerSlots
from stable_megatron.model.attention import (
    AUTO_KERNELS,  # noqa: F401  (re-exported: the kernel choice lives with the kernels)
    SelfAttention,
    SelfAttentionSubmodules,
    attention_kernel,  # noqa: F401
    kernel_for,
)
from stable_megatron.model.recompute import materialises_probabilities, recomputed_kernel


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
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        # SwiGLU: FC1 is [gate; up], 2 x ffn wide, split over TP ranks with stride 2 (each rank
        # holds its columns of both), so the model is the same function at every TP size
        gated_linear_unit=m.activation == "swiglu",
        normalization="RMSNorm" if m.normalization == "rmsnorm" else "LayerNorm",
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


def layer_slots(cfg: Config, layer_number: int = 1) -> LayerSlots:
    """The slots of layer `layer_number`: the plain pre-LN GPT layer, then every enabled
    method's edit, in registry order."""
    slots = LayerSlots(
        qkv=ColumnParallelLinear, proj=RowParallelLinear,
        fc1=ColumnParallelLinear, fc2=RowParallelLinear,
        input_norm=WrappedTorchNorm, q_norm=IdentityOp, k_norm=IdentityOp, v_norm=IdentityOp,
    )
    for method in methods.methods():
        slots.attention_params.update(method.attention_params(cfg))
    for method in methods.enabled(cfg):
        method.edit_layer(slots, cfg, layer_number)
    return slots


def core_attention_spec(cfg: Config, device: torch.device,
                        params: dict | None = None) -> ModuleSpec:
    """The `core_attention` slot: the configured kernel with the methods' kernel parameters
    (`params`; default: those of `cfg`); with `train.recompute=selective`, recomputed in the
    backward if it materialises the probabilities on `device` (model/recompute.py)."""
    if params is None:
        params = layer_slots(cfg).attention_params
    kernel = kernel_for(cfg.model.attention_backend, params, device.type == "cuda")
    if cfg.train.recompute == "selective" and materialises_probabilities(kernel, device):
        kernel = recomputed_kernel(kernel)
    return ModuleSpec(module=kernel, params=dict(params))


def layer_spec(cfg: Config, device: torch.device, layer_number: int = 1) -> ModuleSpec:
    """One GPT layer: megatron-core's TransformerLayer, our attention, the slots of
    `layer_slots`."""
    slots = layer_slots(cfg, layer_number)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=slots.input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=slots.qkv,
                    linear_proj=slots.proj,
                    core_attention=core_attention_spec(cfg, device, slots.attention_params),
                    q_layernorm=slots.q_norm,
                    k_layernorm=slots.k_norm,
                    v_layernorm=slots.v_norm,
                    linear_gate=slots.gate,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                params={"ffn_hidden_size": cfg.model.ffn_size},
                submodules=MLPSubmodules(linear_fc1=slots.fc1, linear_fc2=slots.fc2),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
