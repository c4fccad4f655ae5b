from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.distributed as dist


def pytest_report_header(config) -> str:
    """The machine's fp32 matrix rate, first in every test run's output (CI's included): these
    machines differ several-fold from day to day, so a suite's time means little without it."""
    import time

    import torch

    threads = torch.get_num_threads()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return (f"fp32 matrix rate: {2 * 1024 ** 3 / best / 1e9:.0f} GFLOP/s "
            f"(1024 x 1024 matmul, {threads} threads, best of 5)")


@pytest.fixture(scope="module")
def world_of_one():
    """A world-1 gloo process group and megatron-core's TP=1 groups, for single-process tests
    of tensor-parallel layers; torn down after the module unless they existed before."""
    from megatron.core import parallel_state as mpu

    started = not dist.is_initialized()
    if started:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    owns_mpu = not mpu.model_parallel_is_initialized()
    if owns_mpu:
        mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    if owns_mpu:
        mpu.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process():
    """torch.distributed, megatron-core's TP=1 groups and DeepSpeed's comm for one process, as
    in a one-process training run (`parallel.initialize(1, 1, "cpu")`); torn down after the
    module unless they existed before, with the environment and thread count restored."""
    import os

    import torch

    from stable_megatron import parallel

    env, threads = dict(os.environ), torch.get_num_threads()
    started = not dist.is_initialized()
    try:
        yield parallel.initialize(1, 1, "cpu")
    finally:
        if started:
            parallel.shutdown()
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The built-in corpus at a 1024 vocabulary, prepared once for the session."""
    from stable_megatron.data.dataset import prepare_builtin_data

    cache = tmp_path_factory.mktemp("data-cache")
    prepare_builtin_data(cache, vocab_size=1024)
    return cache
