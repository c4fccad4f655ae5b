"""End-to-end runs of the training entry point: the real deepspeed launcher on CPU, the run
directory it leaves, and resuming by running the same command again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import cpu_env, free_port, torchrun

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
# A smaller model and vocabulary than the recipe's, to keep each run to seconds.
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=64", "data.vocab_size=1024", "train.micro_batch_size=4",
    "train.global_batch_size=8", "train.warmup_steps=2", "train.log_interval=1",
    "train.eval_interval=2", "train.eval_iters=2", "logging.progress=true",
]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_launcher_two_processes_tp2(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
        "--module", "stable_megatron.train", str(TINY), "parallel.tp=2", "train.steps=4",
        f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", *SMALL,
    ]
    if shutil.which("deepspeed") is None:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=400,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = tp 2 x pp 1 x dp 1" in proc.stdout
    assert "step 4/4" in proc.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "consumed_tokens"):
        assert all(key in r for r in records), key
    assert records[-1]["consumed_tokens"] == 4 * 8 * 64
    assert {"val_loss", "val_ppl"} <= records[1].keys() and "val_loss" not in records[0]
    assert (run_dir / "config.yaml").is_file()
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"


@pytest.mark.slow  # by default: bit-exact resume in tests/distributed/test_resume.py, the same
# command resuming in tests/unit/test_checkpoint_corruption.py and test_storage_faults.py
def test_rerun_resumes_and_matches_uninterrupted_run(tmp_path, data_cache):
    worker = ROOT / "stable_megatron" / "train.py"
    common = [str(TINY), "parallel.tp=2", f"data.cache_dir={data_cache}", *SMALL,
              "train.eval_interval=0", "train.steps=4", "train.lr_decay=cosine"]
    straight, resumed = tmp_path / "run_a", tmp_path / "run_b"
    torchrun(worker, 2, [*common, f"train.run_dir={straight}"])
    # Stopped after 2 steps (train.exit_interval checkpoints and exits), then run again.
    first = torchrun(worker, 2, [*common, f"train.run_dir={resumed}", "train.exit_interval=2"])
    again = torchrun(worker, 2, [*common, f"train.run_dir={resumed}"])
    assert "resumed at step 2" in again and "resumed at" not in first
    want = {r["step"]: r for r in read_metrics(straight)}
    got = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6, abs=1e-6)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9)
        assert got[step]["consumed_tokens"] == want[step]["consumed_tokens"]
