"""GPU tests (marker `gpu`): skipped with the reason "needs CUDA" when no CUDA device exists,
so that the default CPU suite collects and skips them; `tools/gpu_check.sh` sets
STABLE_MEGATRON_REQUIRE_GPU=1, which turns a missing GPU into an error instead."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or torch.cuda.is_available():
        return
    if os.environ.get("STABLE_MEGATRON_REQUIRE_GPU") == "1":
        raise pytest.UsageError(
            "STABLE_MEGATRON_REQUIRE_GPU=1 but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"
        )
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)
