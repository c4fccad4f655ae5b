"""Never hang: a rank that stops (SIGSTOP) mid-run makes the others exit within the watchdog's
bound, with their Python stacks dumped and one line naming the stalled step and the silent
rank; and the watchdog's bound and report on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stable_megatron.watchdog import EXIT_STALLED, StepWatchdog
from tests.distributed.launch import cpu_env, free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
FLOOR = 8.0


def test_the_bound_follows_the_run_s_own_step_times(tmp_path):
    dog = StepWatchdog(tmp_path, 0, 1, factor=5, floor=2, exit_process=False)
    assert dog.bound() == 2  # start-up: the floor
    dog.step_done(1, 0.1)
    assert dog.bound() == 2
    dog.step_done(2, 3.0)
    assert dog.bound() == 15  # 5 x the slowest recent step
    with dog.during("checkpoint save"):
        assert dog.bound() == 2 and dog.phase == "checkpoint save"
    assert dog.phase == "step" and dog.step == 3


def test_a_stall_dumps_the_stacks_and_names_the_silent_rank(tmp_path, capsys):
    (tmp_path / ".heartbeat").mkdir()
    (tmp_path / ".heartbeat" / "rank1").write_text("1\n")
    old = time.time() - 60
    os.utime(tmp_path / ".heartbeat" / "rank1", (old, old))
    dog = StepWatchdog(tmp_path, 0, 2, factor=5, floor=0.5, poll=0.1, exit_process=False)
    dog.step_done(6, 0.01)
    dog.start()
    deadline = time.monotonic() + 10
    while dog.fired is None and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert dog.fired is not None
    assert "step 7 did not complete within 0 s" in dog.fired or "step 7 did not complete" \
        in dog.fired
    assert "no heartbeat from rank 1 for 6" in dog.fired  # ~60 s
    stacks = (tmp_path / "stacks" / "rank0.txt").read_text()
    assert "test_watchdog.py" in stacks  # this thread's stack, among all threads'
    assert capsys.readouterr().err.count("error: watchdog (rank 0)") == 1


@pytest.mark.distributed
def test_a_stopped_rank_ends_the_job_within_the_bound(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = cpu_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                           "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stable_megatron.train", str(TINY), "parallel.tp=2",
             "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.seq_length=32", "data.vocab_size=1024", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.steps=100000", "train.log_interval=1",
             "train.eval_interval=0", "metrics.interval=0", "logging.tensorboard=false",
             f"parallel.watchdog_floor_s={FLOOR}", "parallel.watchdog_factor=5",
             f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            time.sleep(0.2)
        pid = int((run_dir / ".heartbeat" / "rank1").read_text())
        assert pid == procs[1].pid
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=FLOOR + 60)
        took = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == EXIT_STALLED
    last = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    lines = [line for line in err.splitlines() if line.startswith("error: watchdog")]
    assert len(lines) == 1, err[-3000:]
    assert f"step {last + 1} did not complete" in lines[0] or \
        f"step {last + 2} did not complete" in lines[0]  # the stop may fall after a step
    assert "no heartbeat from rank 1" in lines[0]
    # within the bound: a step here takes well under a second, so the bound is the floor
    assert took < FLOOR + 15, took
    stacks = (run_dir / "stacks" / "rank0.txt").read_text()
    assert "Thread" in stacks and "train.py" in stacks
