"""Activation recompute (`train.recompute`): trade a second forward for activation memory.

- `full`: every `TransformerLayerPipe` (model/gpt.py) runs its megatron-core `TransformerLayer`
  under `checkpointed`: the forward keeps only the layer's input (and the RoPE angles), and the
  backward runs the layer's forward again to rebuild what its backward needs.
- `selective`: only the core-attention kernel (the `core_attention` slot, model/attention.py)
  runs under `checkpointed`, as megatron-core's selective recompute does: the scores, the capped
  logits and the probabilities (5 a s^2 b bytes per layer in bf16, the one term that grows with
  s^2) are rebuilt in the backward; q, k, v are kept. `model/spec.py` applies it only to kernels
  that materialise the probabilities on the device (`recomputed_kernel` below): a fused kernel
  (SDPA on CPU and GPU, FlexAttention on GPU) already keeps only q, k, v, its output and a
  log-sum-exp row, so recomputing it would cost a forward and save nothing.

Why `torch.utils.checkpoint.checkpoint(use_reentrant=False)` rather than megatron-core's or
DeepSpeed's checkpointing:
- megatron-core's `tensor_parallel.checkpoint` saves the CUDA RNG state through
  `torch.cuda.random.get_rng_state` ("Torch not compiled with CUDA enabled" on CPU): it would
  need a second CPU patch in compat.py;
- DeepSpeed's (`PipelineModule(activation_checkpoint_interval=...)`, `deepspeed.checkpointing`)
  is re-entrant and restores DeepSpeed's own model-parallel RNG tracker, not megatron-core's that
  our layers use, and choosing the layers by class name needs DeepSpeed's global configuration;
- the non-reentrant torch checkpoint runs on any device, works with any `autograd.backward`
  (the pipeline engine's included) without needing an input that requires grad, and restores the
  CPU generator and the generator of every device its inputs are on (the hidden dropout of
  megatron-core's bias-dropout-add draws from these), so a recomputed forward draws the same
  dropout masks and the generators end where they would without recompute.
`checkpointed` adds what the torch checkpoint does not know about: megatron-core's tensor-
parallel RNG tracker (dropout inside tensor-parallel regions) is restored for the recompute as
megatron-core's own checkpoint does, and observers see each forward once: during a recompute,
the forward hooks on the recomputed modules (the output-norm metrics) and `SelfAttention`'s
statistics capture hook are suspended. Hooks inside a recomputed layer must therefore observe
(read) and not change outputs; every hook in this package does.

Recompute applies only where autograd records (training forwards); evaluation under
`torch.no_grad()` runs the plain forward. fp32 losses and gradients are bitwise equal to no
recompute (tests/unit/test_recompute.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stable_megatron.model.attention import CausalAttentionKernel, SelfAttention


def active(module: nn.Module) -> bool:
    """Whether a forward of `module` now should be checkpointed: training with autograd on."""
    return module.training and torch.is_grad_enabled()


def _rng_tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


@contextlib.contextmanager
def _tracker_states(states: dict | None):
    """Run with megatron-core's tensor-parallel RNG tracker at `states`, then as before."""
    if not states:
        yield
        return
    tracker = _rng_tracker()
    outer = tracker.get_states()
    tracker.set_states(dict(states))
    try:
        yield
    finally:
        tracker.set_states(outer)


@contextlib.contextmanager
def _observers_suspended(observed: nn.Module | None):
    """Forward hooks and attention capture hooks inside `observed` off, then restored."""
    if observed is None:
        yield
        return
    hooks, captures = [], []
    for module in observed.modules():
        if module._forward_hooks:
            hooks.append((module, module._forward_hooks))
            module._forward_hooks = OrderedDict()
        if isinstance(module, SelfAttention) and module.capture_hooks:
            captures.append((module, module.capture_hooks))
            module.capture_hooks = {}
    try:
        yield
    finally:
        for module, saved in hooks:
            module._forward_hooks = saved
        for module, saved_hooks in captures:
            module.capture_hooks = saved_hooks


def _contexts(observed: nn.Module | None):
    """`context_fn` of the torch checkpoint: called at the forward; the second context wraps
    the recompute."""
    tracker = _rng_tracker()
    states = tracker.get_states() if tracker.is_initialized() else None

    @contextlib.contextmanager
    def recompute():
        with _tracker_states(states), _observers_suspended(observed):
            yield

    return contextlib.nullcontext(), recompute()


def checkpointed(function: Callable, *args, observed: nn.Module | None = None):
    """`function(*args)`, its activations dropped after the forward and recomputed in the
    backward (RNG states restored; observers inside `observed` see the forward only)."""
    return checkpoint(
        function, *args, use_reentrant=False, context_fn=functools.partial(_contexts, observed)
    )


# --------------------------------------------------------------------------------------------
# Selective: the core-attention kernel


class _RecomputedKernel:
    """Mixin before a `CausalAttentionKernel`: its forward runs under `checkpointed`."""

    recomputed: bool = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if active(self):
            return checkpointed(super().forward, q, k, v)
        return super().forward(q, k, v)


@functools.cache
def recomputed_kernel(kernel: type[CausalAttentionKernel]) -> type[CausalAttentionKernel]:
    """`kernel` with its forward recomputed in the backward: a subclass, so that its name,
    what it supports and `isinstance` checks stay those of `kernel`."""
    return type(f"Recomputed{kernel.__name__}", (_RecomputedKernel, kernel),
                {"__module__": __name__, "__qualname__": f"Recomputed{kernel.__name__}"})


def materialises_probabilities(kernel: type[CausalAttentionKernel], device: torch.device) -> bool:
    """Whether `kernel` keeps the s x s probabilities for its backward on `device` (the kernels
    selective recompute is worth applying to)."""
    return device.type not in kernel.fused_on
