"""launch/: the per-node script prints exactly what `plan` generates; the LR sweep covers the
paper's grid; a simulated 2-node run (two `launch/node.sh` invocations, `--no_ssh --node_rank
0/1` on one CPU machine) trains the tiny recipe; the shell scripts pass shellcheck."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from stable_megatron.plan import LaunchSpec, layout_overrides, node_commands
from tests.distributed.launch import cpu_env, free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=64", "data.vocab_size=1024", "train.micro_batch_size=4",
    "train.global_batch_size=8", "train.warmup_steps=1", "train.log_interval=1",
    "train.eval_interval=0", "train.steps=3", "checkpoint.interval=0",
]


def _env(**extra: str) -> dict[str, str]:
    env = cpu_env()
    for key in ("RECIPE", "NODES", "GPUS_PER_NODE", "RUN_DIR", "HOSTFILE", "MASTER_ADDR",
                "MASTER_PORT", "NODE_RANK", "DATA_PREFIX", "DRY_RUN", "SLURM_NODEID"):
        env.pop(key, None)
    env.update(extra)
    return env


def test_node_script_runs_the_command_plan_prints(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-000 slots=8\ngpu-001 slots=8\n")
    recipe = "recipes/rybakov_830m/qk_norm_cap.yaml"
    env = _env(DRY_RUN="1", RECIPE=recipe, NODES="2", GPUS_PER_NODE="8", NODE_RANK="1",
               MASTER_ADDR="gpu-000", HOSTFILE=str(hostfile), RUN_DIR="/shared/runs/x")
    proc = subprocess.run(["bash", str(LAUNCH / "node.sh"), "train.lr=1e-3"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = LaunchSpec(recipe, [*layout_overrides(ROOT / recipe, 16), "train.run_dir=/shared/runs/x",
                               "train.lr=1e-3"], 2, 8, ["gpu-000", "gpu-001"], 29500, str(hostfile))
    assert shlex.split(proc.stdout.strip().splitlines()[-1]) == node_commands(spec)[1]


def test_node_script_stops_on_a_bad_config_before_launching(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\nb slots=8\n")
    env = _env(RECIPE="recipes/rybakov_830m/baseline.yaml", NODES="2", MASTER_ADDR="a",
               HOSTFILE=str(hostfile), RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run(["bash", str(LAUNCH / "node.sh"), "parallel.tp=3"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "error: model.num_attention_heads=16 is not divisible by parallel.tp=3" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_lr_sweep_covers_every_method_and_lr():
    proc = subprocess.run(["bash", str(LAUNCH / "lr_sweep.sh")], env=_env(DRY_RUN="1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 6 * 6
    for method in ("baseline", "qk_norm", "qk_fc_norm", "qkv_norm", "soft_cap", "qk_norm_cap"):
        assert (ROOT / "recipes" / "rybakov_830m" / f"{method}.yaml").is_file()
        for lr in ("6.0e-3", "8.0e-3", "2.0e-2", "4.0e-2", "6.0e-2", "8.0e-2"):
            assert any(f"RECIPE=recipes/rybakov_830m/{method}.yaml," in line
                       and f"train.lr={lr} " in line for line in lines), (method, lr)
    assert "train.min_lr=6.0e-04" in lines[0]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    scripts = [*sorted(LAUNCH.glob("*.sh")), LAUNCH / "slurm.sbatch", LAUNCH / "cluster.env"]
    proc = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow  # ~100 s on 2 cores: two launchers, two config checks, two trainers
def test_simulated_two_node_launch_trains(tmp_path, data_cache):
    """Two launchers on one machine, as two nodes of one GPU each would run them."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "run"
    common = dict(RECIPE="recipes/tiny.yaml", NODES="2", GPUS_PER_NODE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  HOSTFILE=str(hostfile), RUN_DIR=str(run_dir))
    args = [*SMALL, f"data.cache_dir={data_cache}"]
    started = time.time()
    procs = [
        subprocess.Popen(["bash", str(LAUNCH / "node.sh"), *args],
                         env=_env(**common, NODE_RANK=str(rank)), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outputs[1]
    assert "world 2 = tp 1 x pp 1 x dp 2" in outputs[0]
    assert "step 3/3" in outputs[0]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000003"
    print(f"simulated 2-node launch: {time.time() - started:.0f}s")
