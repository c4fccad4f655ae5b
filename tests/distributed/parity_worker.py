"""Worker for the layout-parity tests: trains a small model a few steps at the layout given by
the launcher and saves, per rank, the losses, grad norms, the first step's gradients and the
final weights (with their tensor-parallel partition dims) for the test to reassemble.

usage: torchrun --nproc_per_node N parity_worker.py OUT_DIR CASES_JSON
where CASES_JSON maps a case name to config overrides (plus "steps"); every case runs in the
same processes, one after the other (at its own layout), and writes OUT_DIR/<case>/rank<r>.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


class RandomTokens:
    """Deterministic random token windows: sample i depends on i only."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0) -> None:
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed + i)
        return rng.integers(0, self.vocab, self.seq_len + 1, dtype=np.int64)


def shard_record(param: torch.Tensor, value: torch.Tensor) -> dict:
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    return {"value": value.detach().float().cpu().clone(), "partition_dim": dim,
            "stride": getattr(param, "partition_stride", 1)}


def run_case(overrides: dict, out: Path) -> None:
    from deepspeed.utils import safe_get_full_grad

    from stable_megatron import ds_adapter, parallel
    from stable_megatron.config import config_from_dict, validate
    from stable_megatron.hooks import StepHook, StepRunner, model_hooks
    from stable_megatron.train import build_engine, micro_batches

    steps = overrides.pop("steps", 3)
    cfg = config_from_dict(overrides)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, "cpu")
    layout = state.layout
    engine = build_engine(cfg, state)
    named = list(engine.module.named_parameters())
    first_grads: dict = {}

    def weights() -> dict:  # whole under ZeRO-3 (every rank gathers)
        with ds_adapter.gathered(p for _, p in named):
            return {name: shard_record(p, p) for name, p in named}

    initial = weights()

    class FirstGrads(StepHook):
        """The gradients of the first step, as the optimizer step receives them."""

        def before_update(self, step, grad_norm):
            if not first_grads:
                for name, param in named:
                    first_grads[name] = shard_record(param, safe_get_full_grad(param))
            return False

    runner = StepRunner(engine, [*model_hooks(cfg, engine.module), FirstGrads()])
    data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length)
    accum = engine.gradient_accumulation_steps()
    losses, grad_norms, records = [], [], []
    for step in range(steps):
        first = step * cfg.train.global_batch_size
        batches = micro_batches(data, first, cfg, layout, state.device, accum)
        losses.append(runner.step(step + 1, batches).item())
        grad_norms.append(float(engine.get_global_grad_norm()))
        records.append({})
        runner.after_step(step + 1, records[-1])  # the model's hooks after the update (QK-clip)
    params = weights()
    built_split = None
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init:
        # what the engine's build did (zero.Init): each weight split as its block was built;
        # seen on a probe model built the same way, after the run (its initialisation draws
        # from megatron-core's TP random state, which the run's build does not reseed)
        from stable_megatron.model.gpt import build_model

        with ds_adapter.partitioned_build(True):
            probe = build_model(cfg, state.topology, state.device)
        built_split = [(p.numel(), p.ds_tensor.numel(), p.ds_numel) for p in probe.parameters()]
        del probe
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "layout": {"tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank,
                       "dp_rank": layout.dp_rank, "tp": layout.tp},
            "losses": losses,
            "grad_norms": grad_norms,
            "records": records,
            # how many parameters ZeRO-3 held partitioned (0 below stage 3), of how many
            "partitioned": (sum(ds_adapter.partitioned(p) for _, p in named), len(named)),
            # ZeRO-3 with zero.Init: (placeholder, partition, whole) sizes of each weight as built
            "built_split": built_split,
            "grads": first_grads,
            "initial": initial,
            "params": params,
        },
        out / f"rank{layout.rank}.pt",
    )


def run_cases_of_argv(run_case) -> None:
    """`run_case(overrides, OUT_DIR/<case>)` for every case of CASES_JSON (argv 1 and 2), in
    these processes one after the other, each at its own layout (the model-parallel groups are
    rebuilt between cases); the process groups are shut down at the end."""
    from stable_megatron import parallel

    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    try:
        for name, overrides in cases.items():
            run_case(overrides, out / name)
            parallel.reset_groups()
    finally:
        parallel.shutdown()


def main() -> None:
    run_cases_of_argv(run_case)


if __name__ == "__main__":
    main()
