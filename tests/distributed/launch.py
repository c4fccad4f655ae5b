"""Helpers to run a worker script on N gloo processes with torchrun, under a watchdog."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def torchrun(script: Path, nproc: int, args: list[str], timeout: float = 300) -> str:
    """Run `script args` on `nproc` local processes; raise with the output if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *args,
    ]
    try:
        proc = subprocess.run(
            cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{script.name} x{nproc} timed out after {timeout}s:\n{err.stdout}"
                             f"\n{err.stderr}") from None
    if proc.returncode != 0:
        raise AssertionError(
            f"{script.name} x{nproc} failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
            f"\n{proc.stderr[-6000:]}"
        )
    return proc.stdout
