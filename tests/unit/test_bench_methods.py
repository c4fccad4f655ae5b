"""Smoke test of tools/bench_methods.py: its measurement function on a tiny shape (one process,
a few steps, no memory subprocesses). Checks the structure of the result, never the timings."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_methods.py"
LAYERS = 2


@pytest.fixture(scope="module")
def bench():
    """The script as a module (tools/ is not a package); registered, as dataclasses need."""
    spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def result(bench):
    """One tiny run; the process group, environment and thread count it sets are undone."""
    env, threads = dict(os.environ), torch.get_num_threads()
    started = not dist.is_initialized()
    try:
        yield bench.run_benchmark(
            ["mlra", "sigma_reparam"],  # the baseline comes first by itself
            bench.Shape(hidden=64, layers=LAYERS, heads=4, seq=32, batch=2, vocab=256),
            steps=2,
            warmup=1,
            device="cpu",
            memory=False,
        )
    finally:
        if started:
            from stable_megatron import parallel

            parallel.shutdown()
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)


def test_result_structure(result):
    methods = result["methods"]
    assert list(methods) == ["baseline", "mlra", "sigma_reparam"]
    assert result["attention_paths"] == dict.fromkeys(methods, "sdpa")
    base = methods["baseline"]
    assert base["time_ratio"] == 1.0 and base["param_ratio"] == 1.0
    for name, r in methods.items():
        assert len(r["step_times"]) == 2, name
        assert r["time_s"] > 0 and r["time_ratio"] > 0 and r["tokens_per_s"] > 0, name
        assert r["param_ratio"] > 0, name
        assert r["peak_bytes"] is None and r["mem_ratio"] is None, name  # memory=False
    assert result["vs_math_baseline"] == {}  # no capped method


def test_math_baseline_joins_capped_methods_on_the_math_path(bench):
    """On CPU a cap forces the math attention path, so a math-path baseline is measured too;
    with FlexAttention (CUDA) it is not needed."""
    assert bench.resolve_methods(["qk_norm_cap", "mlra"], on_cuda=False) == [
        "baseline", "qk_norm_cap", "mlra", "baseline_math"
    ]
    assert bench.resolve_methods(["soft_cap"], on_cuda=True) == ["baseline", "soft_cap"]
    assert bench.resolve_methods(["qk_norm", "baseline"], on_cuda=False) == [
        "baseline", "qk_norm"
    ]


def test_parameter_counts(result):
    methods = result["methods"]
    assert methods["mlra"]["param_ratio"] < 1 < methods["sigma_reparam"]["param_ratio"]
    # sigma-reparam adds one scalar gamma per reparameterised linear (qkv, proj, fc1, fc2).
    sigma = methods["sigma_reparam"]
    assert sigma["reparam_linears"] == 4 * LAYERS
    assert sigma["params"] == methods["baseline"]["params"] + sigma["reparam_linears"]
    assert methods["baseline"]["reparam_linears"] == methods["mlra"]["reparam_linears"] == 0


def test_report_and_cli(bench, result):
    report = bench.format_report(result)
    for name in result["methods"]:
        assert name in report
    assert "targets (step time vs baseline): sigma-reparam" in report
    assert report.count("PASS") + report.count("MISS") == 2  # sigma-reparam, MLRA
    assert "QK-norm + cap <= 1.10x: not measured" in report
    with pytest.raises(ValueError, match="unknown method"):
        bench.resolve_methods(["baseline", "nope"], on_cuda=False)
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_bf16_master_steps_fp32_copies_and_keeps_the_model_in_bf16(bench):
    """--precision bf16: the model's parameters become bf16 (the same Parameter objects), AdamW
    steps fp32 copies, the gradient norm is clipped on the copies and the new weights are
    copied back. Built on a plain module so that it runs without a process group."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mixed = bench.Bf16Master(model, optimizer)
    assert list(model.parameters()) == params  # identity kept
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(m.dtype == torch.float32 for m in mixed.masters)
    before = [m.clone() for m in mixed.masters]
    model(torch.randn(4, 8, dtype=torch.bfloat16)).square().mean().backward()
    norm = mixed.step(clip=1e-3)
    assert norm is not None and float(norm) > 0
    assert all(p.grad is None for p in params) and all(m.grad is None for m in mixed.masters)
    for p, m, b in zip(params, mixed.masters, before, strict=True):
        assert not torch.equal(m, b)  # the fp32 copy took the step
        assert torch.equal(p, m.to(torch.bfloat16))  # and the model has its rounding
