"""Worker for the distributed sigma-reparam tests.

On WORLD_SIZE gloo processes, for every TP size dividing it (at world 4: TP=1 with DP=4, TP=2
with DP=2, TP=4), builds a column-parallel (24 -> 32) and a row-parallel (32 -> 20) sigma-reparam
layer from the same seeds, runs x -> column -> gelu -> row, and saves per rank and TP size:
sigma and gamma at init, the outputs and gradients of one step (refresh_spectral_norms, forward,
backward), the power-iteration buffers, sigma after many more power steps with the weight shards,
the dist-checkpointing shapes, and every all-reduce issued per phase (calls of the
`stable_megatron.parallel.all_reduce_` helper with their sizes, calls of
`torch.distributed.all_reduce` with the ranks of their group).

usage: torchrun --nproc_per_node N sigma_worker.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

N_IN, N_HIDDEN, N_OUT = 24, 32, 20  # column: 24 -> 32, row: 32 -> 20
SEQ, BATCH = 5, 3
CONVERGE_ITERS = 200
COL_INIT_ITERS, ROW_INIT_ITERS = 30, 4  # test_sigma_reparam.py's; explicit, not the default


class CollectiveLog:
    """Wraps the project's all-reduce helper and torch.distributed.all_reduce; records calls
    under the current phase name."""

    def __init__(self, parallel_module) -> None:
        self.phases: dict[str, dict[str, list]] = {}
        self.phase: str | None = None
        self._parallel = parallel_module
        helper, raw = parallel_module.all_reduce_, dist.all_reduce

        def counted_helper(tensor, *args, **kwargs):
            if self.phase is not None:
                self.phases[self.phase]["helper"].append(tensor.numel())
            return helper(tensor, *args, **kwargs)

        def counted_raw(tensor, *args, group=None, **kwargs):
            if self.phase is not None:
                ranks = dist.get_process_group_ranks(group) if group is not None else list(
                    range(dist.get_world_size()))
                self.phases[self.phase]["dist"].append(sorted(ranks))
            return raw(tensor, *args, group=group, **kwargs)

        parallel_module.all_reduce_ = counted_helper
        dist.all_reduce = counted_raw

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.phases[phase] = {"helper": [], "dist": []}
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None


def seeded(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def shard(full: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return full.chunk(tp, dim=dim)[rank].clone()


def record(tensor: torch.Tensor, dim: int | None = None) -> dict:
    return {"value": tensor.detach().float().clone(), "partition_dim": dim}


def run_tp(tp: int, log: CollectiveLog) -> dict:
    from megatron.core import parallel_state as mpu
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.utils import init_method_normal

    from stable_megatron.model.sigma_reparam import (
        SigmaReparamColumnParallelLinear,
        SigmaReparamRowParallelLinear,
        refresh_spectral_norms,
    )

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    init = init_method_normal(0.02)

    torch.manual_seed(11)  # the full master weight is drawn from the default generator
    with log("init_col"):
        col = SigmaReparamColumnParallelLinear(
            N_IN, N_HIDDEN, config=config, init_method=init, bias=True, gather_output=False,
            skip_bias_add=False, power_iters=1, init_iters=COL_INIT_ITERS, seed=5,
        )
    torch.manual_seed(12)
    with log("init_row"):
        row = SigmaReparamRowParallelLinear(
            N_HIDDEN, N_OUT, config=config, init_method=init, bias=True, input_is_parallel=True,
            skip_bias_add=True, power_iters=2, init_iters=ROW_INIT_ITERS, seed=6,
        )
    with torch.no_grad():  # non-zero biases, the same at every layout
        col.bias.copy_(shard(seeded(N_HIDDEN, 1), 0, tp, tp_rank))
        row.bias.copy_(seeded(N_OUT, 2))
    out = {
        "init": {"col_sigma": col.sigma.clone(), "row_sigma": row.sigma.clone(),
                 "col_gamma": col.gamma_value.clone(), "row_gamma": row.gamma_value.clone()},
    }

    model = torch.nn.ModuleList([col, row])
    with log("refresh"):
        touched = refresh_spectral_norms(model)
    x = seeded((SEQ, BATCH, N_IN), 3).requires_grad_()
    g = seeded((SEQ, BATCH, N_OUT), 4)
    with log("fwd_col"):
        hidden, none_bias = col(x)
    with log("fwd_row"):
        y, bias = row(F.gelu(hidden))
    assert none_bias is None and bias is row.bias
    final = y + bias
    with log("bwd"):
        (final * g).sum().backward()

    out["step"] = {
        "touched": touched,
        "sigma": {"col": col.sigma.clone(), "row": row.sigma.clone()},
        "tensors": {
            "hidden": record(hidden, 2),
            "output": record(final),
            "x.grad": record(x.grad),
            "col.weight.grad": record(col.weight.grad, 0),
            "col.bias.grad": record(col.bias.grad, 0),
            "col.gamma.grad": record(col.gamma.grad),
            "row.weight.grad": record(row.weight.grad, 1),
            "row.bias.grad": record(row.bias.grad),
            "row.gamma.grad": record(row.gamma.grad),
            "col.u": record(col.u),
            "col.v": record(col.v, 0),
            "row.u": record(row.u, 0),
            "row.v": record(row.v),
        },
    }
    col.power_iteration(CONVERGE_ITERS)
    row.power_iteration(CONVERGE_ITERS)
    with torch.no_grad():
        out["converged"] = {
            "col_sigma": col.sigma.clone(), "row_sigma": row.sigma.clone(),
            "col_sigma_forward": col.spectral_norm().clone(),
            "row_sigma_forward": row.spectral_norm().clone(),
            "col.weight": record(col.weight, 0), "row.weight": record(row.weight, 1),
        }
    out["sharded_shapes"] = {
        f"{name}.{key}": tuple(t.global_shape)
        for name, layer in (("col", col), ("row", row))
        for key, t in layer.sharded_state_dict().items()
        if key in ("weight", "u", "v", "gamma")
    }
    out["collectives"] = log.phases
    log.phases = {}
    out["layout"] = {"tp": tp, "tp_rank": tp_rank, "dp_rank": mpu.get_data_parallel_rank()}
    mpu.destroy_model_parallel()
    return out


def main() -> None:
    from stable_megatron import parallel

    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    log = CollectiveLog(parallel)
    results = {tp: run_tp(tp, log) for tp in (1, 2, 4, 8) if world % tp == 0}
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
