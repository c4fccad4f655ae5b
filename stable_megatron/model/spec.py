"""Config -> megatron-core `TransformerConfig` and the `ModuleSpec` of one transformer layer.

The one place methods are switched on: norms, sigma-reparam and MLRA linears, and the attention
kernel in the `core_attention` slot (`core_attention_spec`; what each kernel supports is
declared on its class in `model/attention.py`)."""

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

from stable_megatron.config import Config
from stable_megatron.model.attention import (
    KERNELS,
    FlexAttention,
    MathAttention,
    SdpaAttention,
    SelfAttention,
    SelfAttentionSubmodules,
)
from stable_megatron.model.layers import HeadLayerNorm, LinearWithOutputNorm
from stable_megatron.model.mlra import mlra_linear_specs
from stable_megatron.model.recompute import materialises_probabilities, recomputed_kernel
from stable_megatron.model.sigma_reparam import (
    SigmaReparamColumnParallelLinear,
    SigmaReparamRowParallelLinear,
)


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


def _with_output_norm(linear: ModuleSpec | type) -> ModuleSpec:
    return ModuleSpec(module=LinearWithOutputNorm, params={"linear": linear})


def _sigma_reparam(cfg: Config, linear: type, layer_number: int, index: int) -> ModuleSpec:
    """`linear`'s sigma-reparam counterpart; the power-iteration start vector is seeded per
    layer and slot (the same at every layout)."""
    sr = cfg.model.sigma_reparam
    module = {
        ColumnParallelLinear: SigmaReparamColumnParallelLinear,
        RowParallelLinear: SigmaReparamRowParallelLinear,
    }[linear]
    seed = cfg.train.seed * 1000 + layer_number * 10 + index
    return ModuleSpec(
        module=module,
        params={
            "power_iters": sr.power_iters,
            "init_iters": sr.init_iters,
            "gamma_init": sr.gamma_init,
            "seed": seed,
        },
    )


# `auto`: the first of these that supports the configuration and is fused on the device; else
# the exact path.
AUTO_KERNELS = (SdpaAttention, FlexAttention)


def attention_kernel(requested: str, cap: float | None, on_cuda: bool) -> str:
    """The kernel for `model.attention_backend`: `auto` takes the fused kernel that supports
    the configuration (SDPA without a cap; FlexAttention with one on GPU, math on CPU)."""
    if requested != "auto":
        return requested
    device = "cuda" if on_cuda else "cpu"
    for kernel in AUTO_KERNELS:
        if device in kernel.fused_on and (cap is None or kernel.supports_cap):
            return kernel.name
    return MathAttention.name


def core_attention_spec(cfg: Config, device: torch.device) -> ModuleSpec:
    """The `core_attention` slot: the configured kernel with the softmax cap; with
    `train.recompute=selective`, recomputed in the backward if it materialises the
    probabilities on `device` (model/recompute.py)."""
    m = cfg.model
    kernel = KERNELS[attention_kernel(m.attention_backend, m.softmax_cap, device.type == "cuda")]
    if cfg.train.recompute == "selective" and materialises_probabilities(kernel, device):
        kernel = recomputed_kernel(kernel)
    return ModuleSpec(module=kernel, params={"softmax_cap": m.softmax_cap})


def layer_spec(cfg: Config, device: torch.device, layer_number: int = 1) -> ModuleSpec:
    """One GPT layer: megatron-core's TransformerLayer, our attention, the configured norms.

    | norm_placement | input LN | q/k LN | v LN | Proj/FC2 output LN |
    | pre_ln         | yes      |        |      |                    |
    | qk_norm        | yes      | yes    |      |                    |
    | qk_fc_norm     | yes      | yes    |      | yes                |
    | qkv_norm       |          | yes    | yes  |                    |
    """
    m = cfg.model
    placement = m.norm_placement
    head_norm = HeadLayerNorm if placement != "pre_ln" else IdentityOp
    linears = {
        "qkv": ColumnParallelLinear,
        "proj": RowParallelLinear,
        "fc1": ColumnParallelLinear,
        "fc2": RowParallelLinear,
    }
    if m.sigma_reparam.enabled:
        for index, name in enumerate(linears):
            if name in m.sigma_reparam.targets:
                linears[name] = _sigma_reparam(cfg, linears[name], layer_number, index)
    qkv, proj, fc1, fc2 = linears.values()
    if m.attention == "mlra":  # validation keeps sigma-reparam off the slots MLRA replaces
        mlra_qkv, mlra_proj = mlra_linear_specs(
            m.mlra.resolved_rank(m.head_dim), m.mlra.targets, m.mlra.factor_init
        )
        qkv = qkv if mlra_qkv is ColumnParallelLinear else mlra_qkv
        proj = proj if mlra_proj is RowParallelLinear else mlra_proj
    if placement == "qk_fc_norm":
        proj, fc2 = _with_output_norm(proj), _with_output_norm(fc2)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if placement == "qkv_norm" else WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    linear_proj=proj,
                    core_attention=core_attention_spec(cfg, device),
                    q_layernorm=head_norm,
                    k_layernorm=head_norm,
                    v_layernorm=HeadLayerNorm if placement == "qkv_norm" else IdentityOp,
                    linear_gate=ColumnParallelLinear if m.attention_gate else None,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                params={"ffn_hidden_size": m.ffn_size},
                submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
