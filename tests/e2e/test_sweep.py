"""`stable-megatron sweep` end to end on a toy grid (2 methods x 2 learning rates, a few steps
of a small model): killed part-way, then run again, it redoes no finished run and resumes the
rest; the summary files describe every run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed.launch import cpu_env

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "recipes" / "repro" / "base.yaml"
SMALL = ["model.hidden_size=64", "model.seq_length=64", "data.vocab_size=1024",
         "train.micro_batch_size=4", "train.global_batch_size=4", "train.steps=8",
         "train.warmup_steps=2", "train.eval_interval=8", "train.eval_iters=1",
         "checkpoint.interval=4", "metrics.interval=4"]


def sweep_cmd(out: Path, data_cache: Path) -> list[str]:
    return [sys.executable, "-m", "stable_megatron.cli", "sweep", str(REPRO),
            "--methods", "baseline,qk_norm", "--lrs", "1e-3,1e-2", "--out", str(out),
            *SMALL, f"data.cache_dir={data_cache}"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_killed_sweep_reruns_no_finished_run(tmp_path, data_cache):
    out = tmp_path / "sweep"
    first = out / "baseline" / "lr_0.001"
    second = out / "baseline" / "lr_0.01"
    env = cpu_env()
    proc = subprocess.Popen(sweep_cmd(out, data_cache), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (first / "sweep_run.json").exists(), 300, "the first run to end")
        wait_for(lambda: (second / "metrics.jsonl").exists(), 300, "the second run to log")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep; its run gets SIGTERM as an orphan
        proc.wait()
    wait_for(lambda: not _running(second), 60, "the orphaned run to stop")
    finished = json.loads((first / "sweep_run.json").read_text())
    assert finished["status"] == "done" and finished["launches"] == 1
    first_log = (first / "metrics.jsonl").read_bytes()
    assert not (second / "sweep_run.json").exists()
    assert not (out / "qk_norm").exists()

    rerun = subprocess.run(sweep_cmd(out, data_cache), env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "1 of 4 runs already ended; skipping them" in rerun.stdout
    assert "baseline lr=0.001: started" not in rerun.stdout
    # the finished run was not touched; every other one ended now
    assert (first / "metrics.jsonl").read_bytes() == first_log
    assert json.loads((first / "sweep_run.json").read_text()) == finished
    second_result = json.loads((second / "sweep_run.json").read_text())
    assert second_result["status"] == "done" and second_result["launches"] == 1
    steps = [json.loads(line)["step"] for line in
             (second / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8

    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert {(r["method"], float(r["lr"]), r["status"]) for r in rows} == {
        (m, lr, "done") for m in ("baseline", "qk_norm") for lr in (1e-3, 1e-2)}
    for row in rows:
        assert float(row["final_loss"]) < float(row["initial_loss"])
    summary = (out / "sweep.md").read_text()
    assert "| baseline | 0/2 |" in summary and "| qk_norm | 0/2 |" in summary
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(sweep_cmd(out, data_cache), env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=120, check=False)
    assert again.returncode == 0 and "4 of 4 runs already ended" in again.stdout


def _running(run_dir: Path) -> bool:
    marker = f"train.run_dir={run_dir}"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in args:
            return True
    return False


def test_seeded_sweep_differs_by_seed_mirrors_results_and_reruns_nothing(tmp_path, data_cache):
    """`--seeds 1,2` at an LR too small to move a weight (1e-30): each run's final checkpoint
    holds its initial weights, so the seeds' checkpoints differ in their initialisation; their
    configs carry train.seed, which orders the data. A rerun, with the run directories and with
    only the committed mirror (a fresh checkout), launches nothing."""
    import torch

    from stable_megatron.checkpoint.export import merged_state_dict, open_checkpoint
    from stable_megatron.config import load_config
    from stable_megatron.data.dataset import TokenWindowDataset
    from stable_megatron.train import resolve_data

    out, results = tmp_path / "sweep", tmp_path / "results"
    cmd = [sys.executable, "-m", "stable_megatron.cli", "sweep", str(REPRO), "--methods",
           "baseline", "--lrs", "1e-30", "--seeds", "1,2", "--jobs", "2", "--out", str(out),
           "--results", str(results), *SMALL, f"data.cache_dir={data_cache}"]
    env = cpu_env()
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    dirs = {seed: out / "baseline" / f"seed_{seed}" / "lr_1e-30" for seed in (1, 2)}
    weights, orders = {}, {}
    for seed, run_dir in dirs.items():
        assert json.loads((run_dir / "sweep_run.json").read_text())["status"] == "done"
        cfg = load_config(str(run_dir / "config.yaml"))
        assert cfg.train.seed == seed
        weights[seed] = merged_state_dict(open_checkpoint(run_dir / "checkpoints"))
        dataset = TokenWindowDataset(resolve_data(cfg).train_prefix, cfg.model.seq_length,
                                     seed=cfg.train.seed)
        orders[seed] = [dataset[i][:8].tolist() for i in range(4)]
    assert weights[1].keys() == weights[2].keys()
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert orders[1] != orders[2]

    # the mirror: each run's record and series, and the summary, written from them
    for seed in (1, 2):
        mirror = results / "baseline" / f"seed_{seed}" / "lr_1e-30"
        assert {p.name for p in mirror.iterdir()} == {"sweep_run.json", "series.jsonl.gz"}
    summary = (results / "sweep.md").read_text()
    assert "mean ± standard deviation over seeds 1, 2" in summary
    assert "| baseline | 2/2 | 0/2 |" in summary
    assert (results / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0 and "2 of 2 runs already ended" in again.stdout
    shutil.rmtree(out)  # a fresh checkout: only the committed mirror is left
    csv_before = (results / "sweep.csv").read_text()
    fresh = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           check=False)
    assert fresh.returncode == 0 and "2 of 2 runs already ended" in fresh.stdout
    assert "started" not in fresh.stdout and not dirs[1].exists()
    assert (results / "sweep.csv").read_text() == csv_before  # regenerated from the mirror
