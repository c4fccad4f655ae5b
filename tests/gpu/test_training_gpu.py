"""On GPUs: every method of recipes/methods/ takes bf16 training steps of the tiny recipe on
one GPU with finite losses; with two GPUs, TP=2 over NCCL reproduces one GPU's losses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import free_port
from tests.e2e.test_train_run import read_metrics

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("train_worker.py")
METHOD_RECIPES = sorted((ROOT / "recipes" / "methods").glob("*.yaml"))
STEPS = 4


def _common(data_cache: Path) -> list[str]:
    return [
        f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=0",
        "logging.tensorboard=false", "logging.progress=false", "parallel.device=cuda",
        f"data.cache_dir={data_cache}", "data.vocab_size=1024",
    ]


def gpu_torchrun(nproc: int, args: list[str], timeout: float = 900) -> str:
    """Run the worker on `nproc` local GPU processes; raise with its output if it fails."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if env.get("DS_ACCELERATOR") == "cpu":  # a CPU setting left in the shell
        env.pop("DS_ACCELERATOR")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), *args]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"worker x{nproc} timed out after {timeout}s:\n{err.stdout}"
                             f"\n{err.stderr}") from None
    if proc.returncode != 0:
        raise AssertionError(f"worker x{nproc} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_every_method_trains_in_bf16_on_one_gpu(tmp_path, data_cache):
    assert len(METHOD_RECIPES) >= 8
    cases = {p.stem: [str(p), "train.precision=bf16"] for p in METHOD_RECIPES}
    out = gpu_torchrun(1, [str(tmp_path), json.dumps(cases), *_common(data_cache)])
    for name in cases:
        assert f"case {name}: backend nccl" in out, out[-3000:]
        losses = _losses(tmp_path / name)
        assert len(losses) == STEPS, name
        assert all(math.isfinite(x) for x in losses), (name, losses)


def test_tp2_over_nccl_matches_one_gpu(tmp_path, data_cache):
    """fp32 (no TF32 anywhere in the model): TP=2 sums each row-parallel output over two
    ranks, so losses differ from one GPU in rounding only."""
    if torch.cuda.device_count() < 2:  # (in the body: without CUDA the reason is "needs CUDA")
        pytest.skip("needs 2 CUDA devices")
    cases = {name: [str(ROOT / "recipes" / "methods" / f"{name}.yaml")]
             for name in ("baseline", "qk_norm_cap")}
    common = _common(data_cache)
    gpu_torchrun(1, [str(tmp_path / "tp1"), json.dumps(cases), *common])
    out = gpu_torchrun(2, [str(tmp_path / "tp2"), json.dumps(cases), *common, "parallel.tp=2"])
    for name in cases:
        assert f"case {name}: backend nccl" in out, out[-3000:]
        one, two = _losses(tmp_path / "tp1" / name), _losses(tmp_path / "tp2" / name)
        assert len(one) == len(two) == STEPS, name
        assert all(math.isfinite(x) for x in one + two), (name, one, two)
        for step, (a, b) in enumerate(zip(one, two, strict=True), 1):
            assert abs(a - b) <= 1e-4 * abs(a), f"{name} step {step}: tp1 {a} tp2 {b}"


def test_zero_stages_follow_stage_1_on_one_gpu(tmp_path, data_cache):
    """DeepSpeed's plain engine at pipeline size 1 (`ds_adapter.DataParallelEngine`) on CUDA:
    ZeRO stages 0, 2 and 3 in fp32 take stage 1's losses (rounding only: the stages sum the
    same gradients in another order), and stage 3 trains in bf16."""
    baseline = str(ROOT / "recipes" / "methods" / "baseline.yaml")
    cases = {f"zero{s}": [baseline, f"parallel.zero_stage={s}"] for s in (0, 1, 2, 3)}
    cases["zero3_bf16"] = [baseline, "parallel.zero_stage=3", "train.precision=bf16"]
    out = gpu_torchrun(1, [str(tmp_path), json.dumps(cases), *_common(data_cache)])
    reference = _losses(tmp_path / "zero1")
    for name in cases:
        assert f"case {name}: backend nccl" in out, out[-3000:]
        losses = _losses(tmp_path / name)
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (name, losses)
        if name != "zero3_bf16":
            for step, (a, b) in enumerate(zip(reference, losses, strict=True), 1):
                assert abs(a - b) <= 1e-4 * abs(a), f"{name} step {step}: {b} vs stage 1 {a}"
