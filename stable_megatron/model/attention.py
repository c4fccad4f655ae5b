"""Tensor-parallel causal self-attention, a drop-in for the `self_attention` slot of a
megatron-core `TransformerLayer` spec, with the layer-norm placements and softmax capping of
Rybakov et al. (methods.md section 3).

QKV is one column-parallel linear whose output is laid out per head as `[q_h; k_h; v_h]`, so a
split over tensor-parallel ranks hands every rank whole heads and TP=2 reproduces TP=1 exactly.
Proj is row-parallel; its bias is returned separately for megatron-core's bias-dropout-add.

Optional pieces:
- `q_layernorm`, `k_layernorm` (qk_norm), plus `v_layernorm` (qkv_norm) on the QKV output (per
  head over d_head, parameters shared by the heads, TP-replicated);
- the softmax cap c of the `core_attention` kernel (its `softmax_cap` parameter, set from
  `model.softmax_cap`): logits `s = q k^T / sqrt(d)` become `capped(s, c) = c * tanh(s / c)`
  before the mask (the one place the formula is written);
- `linear_gate` (gated attention, Qiu et al. 2025, arXiv 2505.06708, head-wise): a
  column-parallel linear d -> H from the module's input; each head's context is multiplied by
  `sigmoid` of its gate before Proj. Its output columns are heads, so a TP rank computes the
  gates of exactly its own heads.

Kernels: the `core_attention` slot (megatron-core's name) takes one of the parameterless kernel
modules below, chosen by `model/spec.py`; each takes q, k, v `[b, h, s, d]` and returns the
causal context. What each supports is declared once, on its class, and checked at construction:

- `SdpaAttention` (`sdpa`): no cap, no dropout; never materialises the probabilities (flash /
  memory-efficient on GPU, fused on CPU); softmax in the inputs' dtype;
- `FlexAttention` (`flex`): the cap as a `score_mod` and the causal mask as a block mask
  (`causal_block_mask`, one per sequence length and device), no dropout; fused on CUDA
  (compiled; the blocks above the diagonal are skipped), eager and slow on CPU (forward only
  there); softmax in the inputs' dtype;
- `MathAttention` (`math`): the cap, no dropout; the exact path on any device: the numbers
  of `exact_attention` (fp32 logits and softmax, the probabilities materialised and cast to
  v's dtype), computed in blocks of query rows against the keys each can see, with a
  hand-written backward (`_ExactAttention`).

Attention statistics: every kernel alike, through the capture hook below (none computes
them). `flex` without a cap runs SDPA. No kernel applies attention dropout: the config rejects
`model.attention_dropout` > 0 (config/rules.py, `validate`).

Capture hooks: a part that needs to see the attention logits sets a capture hook on the module
under its own name (the stability metrics, `metrics/attention.py`, on metric steps; QK-clip's
per-head maxima, on every step); every forward then hands each hook an `AttentionCapture` (the
detached q and k the kernel saw, the cap, the rank's first head) after the kernel ran. The
kernel's output and gradients do not depend on whether hooks are set; the model computes no
statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    linear_proj: ModuleSpec | type
    core_attention: ModuleSpec | type
    q_layernorm: ModuleSpec | type = IdentityOp
    k_layernorm: ModuleSpec | type = IdentityOp
    v_layernorm: ModuleSpec | type = IdentityOp
    linear_gate: ModuleSpec | type | None = None  # gated attention: a column-parallel d -> H


def capped(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The softmax cap of Rybakov et al.: `cap * tanh(scores / cap)` (None: no cap)."""
    return scores if cap is None else cap * torch.tanh(scores / cap)


def future_keys(start: int, stop: int, keys: int, device: torch.device) -> torch.Tensor:
    """[stop - start, keys] bool: True where key j lies after query i (start <= i < stop)."""
    queries = torch.arange(start, stop, device=device)
    return torch.arange(keys, device=device)[None, :] > queries[:, None]


def scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`q k^T / sqrt(d_head)` in fp32, before capping and masking: [b, h, s_q, s_k]."""
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.size(-1))


def masked_logits(scores: torch.Tensor, cap: float | None, future: torch.Tensor) -> torch.Tensor:
    """The logits the softmax takes: `scores` capped, then the `future` keys at -inf."""
    return capped(scores, cap).masked_fill(future, float("-inf"))


def causal_logits(q: torch.Tensor, k: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """Attention logits after capping, fp32, future keys at -inf: [b, h, s, s]."""
    seq = q.size(-2)
    return masked_logits(scaled_scores(q, k), cap, future_keys(0, seq, seq, q.device))


# --------------------------------------------------------------------------------------------
# Kernels (the `core_attention` slot)


class CausalAttentionKernel(torch.nn.Module):
    """q, k, v `[batch, heads, seq, head_dim]` -> the causal context, same shape. Subclasses
    declare what they support; construction refuses a configuration they cannot run."""

    name: ClassVar[str]
    supports_cap: ClassVar[bool]
    supports_dropout: ClassVar[bool] = False
    fused_on: ClassVar[frozenset[str]]  # device types where it never materialises probabilities

    def __init__(
        self, config: TransformerConfig | None = None, layer_number: int | None = None,
        softmax_cap: float | None = None, **_unused,
    ) -> None:
        super().__init__()
        if softmax_cap is not None and not self.supports_cap:
            able = ", ".join(k.name for k in KERNELS.values() if k.supports_cap)
            raise ValueError(f"the {self.name} kernel cannot apply a softmax cap: use {able}")
        dropout = getattr(config, "attention_dropout", 0.0) or 0.0
        if dropout and not self.supports_dropout:
            raise ValueError(
                f"the {self.name} kernel does not apply attention dropout "
                f"(attention_dropout={dropout})"
            )
        self.softmax_cap = softmax_cap

    def extra_repr(self) -> str:
        return f"softmax_cap={self.softmax_cap}"


class SdpaAttention(CausalAttentionKernel):
    name = "sdpa"
    supports_cap = False
    fused_on = frozenset({"cpu", "cuda"})

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


_compiled_flex = None


def _causal_mask_mod(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def causal_block_mask(seq: int, device: torch.device):
    """FlexAttention's causal `BlockMask` for `seq` queries and keys on `device`, built once per
    (seq, device) and shared by every layer: the kernel skips the blocks above the diagonal and
    applies the mask element-wise only in the blocks it cuts."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=seq, KV_LEN=seq,
                             device=device)


@functools.cache
def _cap_score_mod(cap: float):
    """The cap as a `score_mod`; one function object per cap, so that the compiled kernel is
    not re-traced for every layer."""

    def score_mod(score, batch, head, q_idx, kv_idx):
        return capped(score, cap)

    return score_mod


class FlexAttention(CausalAttentionKernel):
    """FlexAttention with the cap as a `score_mod` and the causal mask as a block mask
    (compiled on CUDA, eager on CPU, where it runs forward only); without a cap, SDPA."""

    name = "flex"
    supports_cap = True
    fused_on = frozenset({"cuda"})

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        global _compiled_flex
        cap = self.softmax_cap
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention.flex_attention import flex_attention

        mask = causal_block_mask(q.size(-2), q.device)
        if q.is_cuda:
            if _compiled_flex is None:
                _compiled_flex = torch.compile(flex_attention, dynamic=False)
            return _compiled_flex(q, k, v, score_mod=_cap_score_mod(cap), block_mask=mask)
        return flex_attention(q, k, v, score_mod=_cap_score_mod(cap), block_mask=mask)


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float | None = None
) -> torch.Tensor:
    """The definition, through autograd: `softmax(causal_logits) v`, fp32 logits and softmax,
    the probabilities cast to v's dtype. The math kernel computes the same numbers faster."""
    probs = torch.softmax(causal_logits(q, k, cap), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


# Query rows per block of the math kernel: a block meets only the keys it can see (at seq 512,
# 62.5% of the square), and its scores stay small enough to be reused from cache by the
# elementwise passes. Up to this length (one block), outputs and gradients are bit-equal to
# `exact_attention`; longer, equal to fp32 rounding. None: always one block.
MATH_BLOCK_ROWS: int | None = 128


class _ExactAttention(torch.autograd.Function):
    """`exact_attention` with a hand-written backward, in blocks of query rows.

    Forward, per block of rows [i0, i1) against keys [0, i1): the same operations as
    `exact_attention` (done in place where autograd would allocate), saving only tanh's output
    t and the probabilities p. Backward: autograd's own formulas in its order (softmax backward,
    x cap, tanh backward `g (1 - t^2)`, / cap, / sqrt(d)), so that with one block every number
    is bit-equal to autograd's; with several blocks the sums over keys skip the masked zeros
    and differ from it in fp32 rounding only."""

    @staticmethod
    def forward(ctx, q, k, v, cap: float | None, block: int):
        seq, scale = q.size(-2), math.sqrt(q.size(-1))
        # contiguous once: the model hands in permuted views, which every block's matmul
        # would otherwise copy
        qf, kf, v = q.float().contiguous(), k.float().contiguous(), v.contiguous()
        out = torch.empty(q.shape, dtype=v.dtype, device=q.device)
        diagonal = future_keys(0, block, block, q.device)  # the future keys in a block's square
        saved = []
        for i0 in range(0, seq, block):
            i1 = min(seq, i0 + block)
            scores = torch.matmul(qf[..., i0:i1, :], kf[..., :i1, :].transpose(-1, -2))
            scores.div_(scale)
            if cap is None:
                t, logits = None, scores
            else:
                t = scores.div_(cap).tanh_()
                logits = t * cap
            logits[..., i0:].masked_fill_(diagonal[:i1 - i0, :i1 - i0], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            out[..., i0:i1, :] = torch.matmul(probs.to(v.dtype), v[..., :i1, :])
            saved += [probs] if t is None else [t, probs]
        ctx.save_for_backward(qf, kf, v, *saved)
        ctx.cap, ctx.block, ctx.dtypes = cap, block, (q.dtype, k.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qf, kf, v, *saved = ctx.saved_tensors
        cap, block = ctx.cap, ctx.block
        seq, scale = qf.size(-2), math.sqrt(qf.size(-1))
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(qf)
        grad_k = torch.zeros_like(kf)
        grad_v = torch.zeros(v.shape, dtype=torch.float32 if block < seq else v.dtype,
                             device=v.device)
        per_block = 1 if cap is None else 2
        for n, i0 in enumerate(range(0, seq, block)):
            i1 = min(seq, i0 + block)
            *t, probs = saved[per_block * n:per_block * (n + 1)]
            g = grad_out[..., i0:i1, :]
            grad_v[..., :i1, :] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), g)
            grad_probs = torch.matmul(g, v[..., :i1, :].transpose(-1, -2)).float()
            grad = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32)
            if cap is not None:
                grad = torch.ops.aten.tanh_backward(grad.mul_(cap), t[0]).div_(cap)
            grad.div_(scale)
            grad_q[..., i0:i1, :] = torch.matmul(grad, kf[..., :i1, :])
            grad_k[..., :i1, :] += torch.matmul(grad.transpose(-1, -2), qf[..., i0:i1, :])
        q_dtype, k_dtype = ctx.dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v.dtype), None, None


class MathAttention(CausalAttentionKernel):
    """The exact path, any device: `exact_attention`'s numbers (`_ExactAttention`)."""

    name = "math"
    supports_cap = True
    fused_on = frozenset()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seq = q.size(-2)
        block = min(seq, MATH_BLOCK_ROWS or seq)
        return _ExactAttention.apply(q, k, v, self.softmax_cap, block)


KERNELS: dict[str, type[CausalAttentionKernel]] = {
    kernel.name: kernel for kernel in (SdpaAttention, FlexAttention, MathAttention)
}


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


def kernel_for(requested: str, params: dict, on_cuda: bool) -> type[CausalAttentionKernel]:
    """The kernel class for `model.attention_backend` and the kernel's constructor `params`
    (the methods' `attention_params`)."""
    return KERNELS[attention_kernel(requested, params.get("softmax_cap"), on_cuda)]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "sdpa",
    cap: float | None = None,
) -> torch.Tensor:
    """One call of the named kernel: q, k, v `[b, h, s, d]` -> `[b, h, s, d]`."""
    return KERNELS[kernel](softmax_cap=cap)(q, k, v)


# --------------------------------------------------------------------------------------------
# The module


GATE_SEED_OFFSET = 7_919  # the gate's init stream: the layer's seed + this


@dataclass(frozen=True)
class AttentionCapture:
    """What one forward shows a capture hook: q and k `[b, heads, s, d]` as the kernel took
    them (after the head norms and RoPE), detached; the kernel's softmax cap; the global index
    of this rank's first head. The mask is causal (query i sees keys 0 .. i)."""

    q: torch.Tensor
    k: torch.Tensor
    softmax_cap: float | None
    first_head: int


class SelfAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        **unused,
    ) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp
        # heads are split over TP ranks in order: this rank holds first_head .. + heads_local - 1
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
        self.first_head = tp_rank * self.heads_local
        self.capture_hooks: dict[str, Callable[[AttentionCapture], None]] = {}
        width = config.num_attention_heads * self.head_dim
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            3 * width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
        )
        eps = config.layernorm_epsilon
        head_norm = {"config": config, "hidden_size": self.head_dim, "eps": eps}
        self.q_layernorm = build_module(submodules.q_layernorm, **head_norm)
        self.k_layernorm = build_module(submodules.k_layernorm, **head_norm)
        self.v_layernorm = build_module(submodules.v_layernorm, **head_norm)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            width,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
        )
        self.linear_gate = None
        if submodules.linear_gate is not None:
            # drawn from a stream of its own (the layer's seed + an offset), leaving the global
            # RNG as it was: every other weight of the model equals the ungated model's
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed() + GATE_SEED_OFFSET)
                self.linear_gate = build_module(
                    submodules.linear_gate,
                    config.hidden_size,
                    config.num_attention_heads,
                    config=config,
                    init_method=config.init_method,
                    gather_output=False,
                    bias=config.add_bias_linear,
                    skip_bias_add=False,
                    is_expert=False,
                )

    @property
    def kernel(self) -> str:
        return self.core_attention.name

    @property
    def softmax_cap(self) -> float | None:
        return self.core_attention.softmax_cap

    def set_capture_hook(
        self, owner: str, hook: Callable[[AttentionCapture], None] | None
    ) -> None:
        """`hook` receives an `AttentionCapture` of every forward until `owner`'s hook is set
        back to None; hooks of other owners are kept."""
        if hook is None:
            self.capture_hooks.pop(owner, None)
        else:
            self.capture_hooks[owner] = hook

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, **_):
        seq, batch, _ = hidden_states.shape
        qkv, _ = self.linear_qkv(hidden_states)
        q, k, v = qkv.view(seq, batch, self.heads_local, 3, self.head_dim).unbind(dim=3)
        q, k, v = self.q_layernorm(q), self.k_layernorm(k), self.v_layernorm(v)
        if rotary_pos_emb is not None:
            q = apply_rotary_pos_emb(q, rotary_pos_emb, config=self.config)
            k = apply_rotary_pos_emb(k, rotary_pos_emb, config=self.config)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        context = self.core_attention(q, k, v)
        if self.linear_gate is not None:  # [s, b, heads] -> [b, heads, s, 1]
            gate, _ = self.linear_gate(hidden_states)
            context = context * torch.sigmoid(gate).permute(1, 2, 0).unsqueeze(-1)
        if self.capture_hooks:
            capture = AttentionCapture(q.detach(), k.detach(), self.softmax_cap, self.first_head)
            for hook in list(self.capture_hooks.values()):
                hook(capture)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads_local * self.head_dim)
        return self.linear_proj(context)
