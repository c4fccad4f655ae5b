"""The CPU compatibility patches for megatron-core 0.16.1, and only those.

megatron-core assumes a CUDA device in a few places that stable_megatron reaches. On a machine
with CUDA every function here is a no-op, so GPU runs take megatron-core's own code paths; the
device decision itself is made once, in `stable_megatron.parallel.select_device`.

Patches (each applied by `apply_cpu_patches`, idempotent):

1. RNG tracker. `tensor_parallel.random.CudaRNGStatesTracker` keeps per-TP-rank generator
   states (used for dropout inside tensor-parallel regions) in the CUDA generator, through
   `torch.cuda.get_rng_state` / `torch.cuda.manual_seed`. We install a tracker with the same
   interface that keeps those states for the CPU default generator instead.

Everything else the project needs runs on CPU as it is: `initialize_model_parallel`, the
column/row-parallel linear layers and the vocab-parallel embedding with
`use_cpu_initialization=True`, `vocab_parallel_cross_entropy`, and `TransformerLayer`. The
modules that hard-code CUDA (megatron-core's pipeline schedules, DistributedOptimizer,
sequence parallelism, the default causal-mask helper) are not used: pipelining runs on
DeepSpeed's engine and attention masks come from our own attention module.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """`CudaRNGStatesTracker` with its named states kept for the CPU generator."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply_cpu_patches() -> None:
    """Install the CPU replacements; does nothing on a CUDA machine."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
