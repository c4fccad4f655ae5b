"""Smoke test of tools/benchmark.py: the script in a subprocess on a very small shape for 2 steps
against the plain and megatron-core references, with a profile; the parallel and growth tables
from made-up results. Checks that the report carries the fields and ratios, never their values."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SCRIPT = TOOLS / "benchmark.py"
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.seq_length=32", "data.vocab_size=256", "train.micro_batch_size=2",
         "train.global_batch_size=4"]
STEPS = 2
NUMBER = r"-?\d+(\.\d+)?"


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore"}
    for name in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)  # a world of one with its own port
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    saved = tmp_path_factory.mktemp("benchmark") / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--vs", "plain", "--vs", "mcore",
         "--methods", "zero0", "--steps", str(STEPS), "--warmup", "1", "--profile", "3",
         "--save", str(saved),
         *SMALL],
        capture_output=True, text=True, env=_env(), timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(saved.read_text())


def _row(report: str, name: str) -> str:
    return next(line for line in report.splitlines() if line.split()[:1] == [name])


def test_report_has_the_fields_and_ratios(run):
    report, _ = run
    assert re.search(rf"MFU against: measured float32 matmul rate .*= {NUMBER} GFLOP/s", report)
    assert "world 1" in report and "2 layers x hidden 64" in report
    header = next(line for line in report.splitlines() if line.startswith("arm "))
    for field in ("step ms", "tokens/s", "GFLOP/s", "MFU", "data wait", "peak MiB", "state MiB",
                  "vs ours"):
        assert field in header
    for arm in ("ours", "plain", "mcore"):
        row = _row(report, arm)
        # step ms, IQR, tokens/s, GFLOP/s, MFU, data wait, peak MiB, state MiB, faults/step,
        # two ratios
        assert len(re.findall(NUMBER, row)) == 11, row
        assert len(re.findall(rf"\s{NUMBER}x", row)) == 2, row
    for ref in ("plain", "mcore"):
        assert re.search(rf"ours / {ref} = {NUMBER}x step time .*target <= 1.0x (PASS|MISS)",
                         report)
    assert re.search(rf"ours: data wait {NUMBER}% of the step time", report)
    for ref in ("plain", "mcore"):  # a ZeRO stage against each reference
        assert re.search(rf"zero0 / {ref} = {NUMBER}x step time \(paired {NUMBER}x\), "
                         rf"{NUMBER}x state memory", report)
    for arm in ("ours", "plain", "mcore"):
        assert re.search(rf"profile of one step of {arm}: wall {NUMBER} ms", report)
    assert "aten::" in report


def test_saved_result(run):
    _, result = run
    assert set(result["arms"]) == {"ours", "plain", "mcore", "zero0"}
    for name, r in result["arms"].items():
        assert len(r["step_times"]) == len(r["data_times"]) == STEPS, name
        for key in ("time_s", "tokens_per_s", "tflops", "mfu", "data_wait", "faults_per_step",
                    "vs_ours"):
            assert math.isfinite(r[key]) and r[key] >= 0, (name, key)
        assert r["peak_bytes"] is not None and r["state_bytes"] > 0, name
    assert result["arms"]["ours"]["vs_ours"] == 1.0
    # stage 1 keeps flat copies of the weights and gradients that stage 0 does not
    assert result["arms"]["zero0"]["state_bytes"] < result["arms"]["ours"]["state_bytes"]
    assert result["peak"]["tflops"] > 0 and result["shape"]["accumulation"] == 2
    assert "keep_cpu_memory" in result["cpu_malloc"]


@pytest.mark.parametrize("args, message", [
    (["--vs", "nanogpt"], "unknown reference nanogpt"),
    (["--shape", "huge"], "unknown shape huge"),
    (["--methods", "qk_nrm"], "unknown method qk_nrm"),
    (["--growth", "--vs", "plain"], "go with a comparison run"),
    (["--zero", "--methods", "zero0"], "go with a comparison run"),
    (["--methods", "zero4"], "unknown method zero4"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_cli_errors(args, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_override_is_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "model.num_layerz=2"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "num_layerz" in proc.stderr


def _tool():
    """The script as a module (tools/ is not a package), loaded once."""
    if "benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # registered, as its dataclasses need
        spec.loader.exec_module(module)
    return sys.modules["benchmark"]


def test_method_overrides_and_growth_points():
    bm = _tool()
    assert bm.method_overrides("baseline") == []
    assert bm.method_overrides("qk_norm_cap") == ["model.norm_placement=qk_norm",
                                                  "model.softmax_cap=50.0"]
    assert bm.method_overrides("mlra_qkvo") == ["model.attention=mlra",
                                                'model.mlra.targets=["q", "k", "v", "o"]']
    assert bm.method_overrides("muon") == ["train.optimizer=muon"]
    assert bm.parse_args(["--methods", "muon,qk_norm"]).method_list == ["muon", "qk_norm"]
    assert bm.method_overrides("zero3") == ["parallel.zero_stage=3"]
    assert bm.zero_stage_of("zero4") is None and bm.zero_stage_of("zero0") == 0
    points = bm.growth_points()
    assert [v for a, v, _ in points if a == "seq"] == [128, 256, 512, 1024]
    assert [v for a, v, _ in points if a == "hidden"] == [128, 256, 512, 1024]


def test_live_tensor_bytes_counts_a_gradient_python_has_not_read():
    """A gradient autograd accumulated has no Python object until read; the model-state
    measure counts it all the same (4 MiB here)."""
    import torch

    bm = _tool()
    weight = torch.nn.Parameter(torch.zeros(1 << 20))
    before = bm.live_tensor_bytes()
    (weight * 2).sum().backward()
    grown = bm.live_tensor_bytes() - before
    assert 4 << 20 <= grown < 5 << 20, grown
    assert weight.grad is not None


def test_parallel_and_growth_tables():
    bm = _tool()
    shape = {"layers": 2, "hidden": 64, "heads": 4, "seq": 32, "micro_batch": 2,
             "global_batch": 4, "accumulation": 2, "vocab": 256, "precision": "fp32",
             "tp": 1, "pp": 1, "dp": 1}
    layout = {"world": 2, "threads": 1, "shape": shape, "time_s": 0.2, "spread": 0.1,
              "tokens_per_s": 640.0, "data_wait": 0.01, "peak_bytes": 2**20, "efficiency": 0.8}
    result = {"cores": 2, "rounds": 1, "steps": 2, "warmup": 1,
              "layouts": {"world 1": {**layout, "world": 1, "threads": 2, "efficiency": 1.0},
                          "TP2": layout, "PP2": layout, "DP2": layout}}
    text = bm.format_parallel(result)
    for label in ("world 1", "TP2", "PP2", "DP2"):
        assert re.search(rf"^{label}\s.*\s{NUMBER}$", text, re.M), text
    points = [{"axis": a, "value": v, "time_s": 0.1 * v, "spread": 0.0, "flops": 1e9 * v,
               "tflops": 0.01, "flop_ratio": v / 128, "time_ratio": v / 128,
               "time_per_flop": 1.0} for a, v, _ in bm.growth_points()]
    text = bm.format_growth({"device": "cpu", "threads": 2, "layers": 4, "points": points,
                             "steps": 2, "warmup": 1})
    assert "sequence length" in text and "hidden size" in text and "time/FLOP x" in text
    assert len(re.findall(r"^1024\s", text, re.M)) == 2
    stages = {label: {**layout, "model_state_bytes": 2**20 * (4 - stage), "zero_stage": stage,
                      "update_state_bytes": 2**20 * (5 - stage), "update_vs_stage1": 1.0,
                      "backward_state_bytes": 2**20 * (6 - stage),
                      "step_state_bytes": 2**20 * (6 - stage), "step_vs_stage1": 1.0,
                      "state_vs_stage1": (4 - stage) / 3, "time_vs_stage1": 1.0}
              for stage, (label, _) in enumerate(bm.ZERO_RUNS)}
    text = bm.format_zero({"layouts": stages, "rounds": 1, "steps": 2, "warmup": 1})
    for label, _ in bm.ZERO_RUNS:
        assert re.search(rf"^{label}\s.*\s{NUMBER}x\s", text, re.M), text
    assert "state at the update" in text and "state between steps" in text
    assert "state after backward" in text and "step's high" in text


@pytest.mark.slow
def test_zero_mode_runs_each_stage_at_dp2(tmp_path):
    """`--zero`: each stage in a launch of 2 processes; at DP2 ZeRO-1 holds less model state
    per rank than ZeRO-0 (Adam's moments split: 4 + 12 / 2 bytes a parameter against 12
    between steps), and at the update ZeRO-3 less than ZeRO-1 (16 / dp bytes a parameter
    and a reduce bucket, against 4 + 16 / dp: docs/performance.md#zero-stages)."""
    saved = tmp_path / "zero.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--zero", "--shape", "tiny", "--steps",
                           "1", "--warmup", "1", "--save", str(saved), *SMALL],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lay = json.loads(saved.read_text())["layouts"]
    assert [r["zero_stage"] for r in lay.values()] == [0, 1, 2, 3, 3]
    assert lay["ZeRO-1"]["model_state_bytes"] < lay["ZeRO-0"]["model_state_bytes"]
    assert lay["ZeRO-3"]["update_state_bytes"] < lay["ZeRO-1"]["update_state_bytes"]
    # stage 1 holds its gradients whole after the backward, its partition at the update
    assert lay["ZeRO-1"]["backward_state_bytes"] > lay["ZeRO-1"]["update_state_bytes"]
    assert "state at the update MiB" in proc.stdout
