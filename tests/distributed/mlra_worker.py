"""Worker for the MLRA tensor-parallel tests (2 gloo processes, one launch).

For TP=1 (both ranks, data-parallel) and then TP=2, and for each case: seed, build the two
attention slots from `mlra_linear_specs` the way our SelfAttention builds them, run a small
causal attention harness (QKV -> per-head sdpa -> Proj) forward and backward on a fixed input,
and record the output, the input gradient, every parameter and gradient (with its partition
dim), and the all-reduces issued. A standard-attention harness (megatron-core's column/row
parallel linears) is recorded the same way for the communication comparison.

usage: torchrun --nproc_per_node 2 mlra_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

D_MODEL, HEADS, D_HEAD, SEQ, BATCH = 32, 4, 8, 6, 2
CASES = {
    "qkvo": {"targets": ["q", "k", "v", "o"], "rank": None, "bias": True},
    "qv_r3_nobias": {"targets": ["q", "v"], "rank": 3, "bias": False},
    "ko_r5_input_side": {"targets": ["k", "o"], "rank": 5, "bias": True,
                         "factor_init": "input_side"},
    "standard": {"targets": [], "rank": None, "bias": True},
}


class AllReduceLog:
    """Records the element count of every all-reduce over more than one process."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._original = dist.all_reduce

    def __enter__(self):
        def logged(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            if dist.get_world_size(group) > 1:
                self.sizes.append(tensor.numel())
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = logged
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original


def record(param: torch.Tensor, value: torch.Tensor) -> dict:
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    return {"value": value.detach().clone(), "partition_dim": dim}


def run_case(tp: int, case: dict, seed: int) -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from stable_megatron.model.mlra import mlra_linear_specs

    cfg = TransformerConfig(
        num_layers=2, hidden_size=D_MODEL, num_attention_heads=HEADS, kv_channels=D_HEAD,
        add_bias_linear=case["bias"], init_method_std=0.02, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
    )
    if case["targets"]:
        qkv_spec, proj_spec = mlra_linear_specs(
            case["rank"], case["targets"], case.get("factor_init", "balanced")
        )
    else:
        qkv_spec, proj_spec = ColumnParallelLinear, RowParallelLinear
    width, heads_local = HEADS * D_HEAD, HEADS // tp
    torch.manual_seed(seed)  # the per-layer seed of the real model
    qkv = build_module(
        qkv_spec, D_MODEL, 3 * width, config=cfg, init_method=cfg.init_method,
        gather_output=False, bias=cfg.add_bias_linear, skip_bias_add=False, is_expert=False,
    )
    proj = build_module(
        proj_spec, width, D_MODEL, config=cfg, init_method=cfg.output_layer_init_method,
        bias=cfg.add_bias_linear, input_is_parallel=True, skip_bias_add=True, is_expert=False,
    )
    gen = torch.Generator().manual_seed(seed + 1000)  # same data on every rank and layout
    x = torch.randn(SEQ, BATCH, D_MODEL, generator=gen).requires_grad_()
    probe = torch.randn(SEQ, BATCH, D_MODEL, generator=gen)
    with AllReduceLog() as log:
        out, _ = qkv(x)
        q, k, v = out.view(SEQ, BATCH, heads_local, 3, D_HEAD).unbind(dim=3)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        context = context.permute(2, 0, 1, 3).reshape(SEQ, BATCH, heads_local * D_HEAD)
        y, bias = proj(context)
        if bias is not None:
            y = y + bias
        (y * probe).sum().backward()
    named = [*qkv.named_parameters(prefix="qkv"), *proj.named_parameters(prefix="proj")]
    return {
        "out": y.detach().clone(),
        "x_grad": x.grad.clone(),
        "params": {n: record(p, p) for n, p in named},
        "grads": {n: record(p, p.grad) for n, p in named},
        "all_reduce_sizes": log.sizes,
    }


def main() -> None:
    from megatron.core import parallel_state as mpu

    warnings.filterwarnings("ignore")
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for tp in (1, 2):
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
        tp_rank = mpu.get_tensor_model_parallel_rank()
        for i, (name, case) in enumerate(CASES.items()):
            results[(tp, name)] = {**run_case(tp, case, seed=1234 + i), "tp_rank": tp_rank}
        mpu.destroy_model_parallel()
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
