"""Automatic relaunch (launch/common.sh: `run_with_restarts`, `--max-restarts N`): a failed run
is relaunched and resumes; the exit codes a relaunch cannot fix stop it at once. The chaos test
SIGKILLs a rank of a TP2 run at two steps and checks that the relaunched run's losses equal an
uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.launch import cpu_env

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "launch" / "common.sh"


def loop(tmp_path: Path, codes: list[int], *flags: str) -> subprocess.CompletedProcess:
    """`run_with_restarts` around a command that exits with `codes`, one per launch."""
    script = tmp_path / "codes"
    script.write_text("\n".join(map(str, codes)) + "\n")
    fake = (f'n=$(head -1 {script}); sed -i 1d {script}; echo "launch $n" >> {tmp_path}/log; '
            f'exit "$n"')
    bash = (f'source {COMMON}; restart_flags "$@"; echo "args ${{ARGS[*]}}"; '
            f"run_with_restarts bash -c '{fake}'")
    return subprocess.run(["bash", "-c", bash, "loop", *flags], capture_output=True, text=True,
                          env=cpu_env() | {"RESTART_BACKOFF": "0"}, timeout=60, check=False)


def launches(tmp_path: Path) -> int:
    return len((tmp_path / "log").read_text().splitlines())


def test_a_failure_is_relaunched_until_it_finishes(tmp_path):
    proc = loop(tmp_path, [4, 137, 0], "--max-restarts", "3", "train.lr=1e-3")
    assert proc.returncode == 0 and launches(tmp_path) == 3
    assert "args train.lr=1e-3" in proc.stdout  # the flag is the wrapper's, the rest is passed
    assert "exit code 4 (the step watchdog found a stalled step); relaunch 1 of 3" in proc.stderr
    assert "exit code 137 (a process was killed); relaunch 2 of 3" in proc.stderr


def test_the_codes_a_relaunch_cannot_fix_stop_at_once(tmp_path):
    for code, why in ((2, "a config, data or checkpoint error"),
                      (3, "training aborted: the rollback limit")):
        (tmp_path / "log").unlink(missing_ok=True)
        proc = loop(tmp_path, [code, 0], "--max-restarts=5")
        assert proc.returncode == code and launches(tmp_path) == 1
        assert f"exit code {code} ({why}): a relaunch cannot fix it; not relaunching" in \
            proc.stderr


def test_the_relaunches_are_limited(tmp_path):
    proc = loop(tmp_path, [1, 1, 1, 0], "--max-restarts", "2")
    assert proc.returncode == 1 and launches(tmp_path) == 3
    assert "2 of --max-restarts 2 relaunches used: giving up" in proc.stderr
    proc = loop(tmp_path, [1], "--max-restarts", "x")
    assert proc.returncode == 2 and "whole numbers" in proc.stderr


# --------------------------------------------------------------------------------------------
# Chaos: SIGKILL a rank at two steps of a TP2 run under launch/single_node.sh


STEPS = 60
SMALL = [
    "parallel.tp=2", "model.num_layers=2", "model.hidden_size=64",
    "model.num_attention_heads=4", "model.seq_length=32", "data.vocab_size=1024",
    "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=2",
    "train.log_interval=1", "train.eval_interval=0", "metrics.interval=5",
    "logging.tensorboard=false", f"train.steps={STEPS}", "checkpoint.interval=10",
    "parallel.watchdog_floor_s=60",
]


def single_node(run_dir: Path, data_cache: Path, *flags: str) -> subprocess.Popen:
    env = cpu_env() | {"RECIPE": "recipes/tiny.yaml", "NODES": "1", "GPUS_PER_NODE": "2",
                       "RUN_DIR": str(run_dir), "RESTART_BACKOFF": "1",
                       "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    return subprocess.Popen(["bash", "launch/single_node.sh", *flags, *SMALL,
                             f"data.cache_dir={data_cache}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a relaunched run logs the steps after its
    checkpoint again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def newest_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def heartbeat_pid(run_dir: Path, rank: int) -> int | None:
    try:
        return int((run_dir / ".heartbeat" / f"rank{rank}").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.distributed
def test_chaos_two_kills_then_the_same_losses_as_an_uninterrupted_run(tmp_path, data_cache):
    straight = single_node(tmp_path / "straight", data_cache)
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-3000:]
    want = losses(tmp_path / "straight")
    assert sorted(want) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "chaos"
    job = single_node(run_dir, data_cache, "--max-restarts", "3")
    waits = []
    try:
        for kill_at, rank in ((15, 1), (37, 0)):
            deadline = time.monotonic() + 600
            while newest_step(run_dir) < kill_at:
                assert job.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            pid = heartbeat_pid(run_dir, rank)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            while heartbeat_pid(run_dir, rank) in (pid, None):  # the relaunched process
                assert job.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            waits.append(time.monotonic() - killed)
        out, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert out.count("relaunch 1 of 3") == 1 and out.count("relaunch 2 of 3") == 1
    assert "resumed at step 10" in out and "resumed at step 30" in out
    got = losses(run_dir)
    assert got == want  # every step's loss, bit for bit
    assert all(w < 60 for w in waits), waits  # each relaunch within the watchdog floor
