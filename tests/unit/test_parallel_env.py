"""`parallel._ensure_single_process_env`: when a process trains without a launcher."""

from __future__ import annotations

import pytest

from stable_megatron import parallel

MARK = "STABLE_MEGATRON_NO_LAUNCHER"


@pytest.fixture
def env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", MARK):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_launcher_is_alone_and_marks_the_process(env):
    assert parallel._ensure_single_process_env() is True
    import os

    assert os.environ[MARK] == "1" and os.environ["WORLD_SIZE"] == "1"
    assert os.environ["MASTER_PORT"].isdigit()
    assert parallel._ensure_single_process_env() is True  # a second training in this process


def test_a_launcher_of_one_process_is_not_alone(env):
    env.setenv("WORLD_SIZE", "1")
    env.setenv("MASTER_PORT", "29500")
    assert parallel._ensure_single_process_env() is False


def test_an_inherited_mark_never_outweighs_a_launchers_world_size(env):
    """A torchrun child of a process that trained alone before (a test session, a notebook)
    inherits the mark; its launcher's WORLD_SIZE decides."""
    env.setenv(MARK, "1")
    env.setenv("WORLD_SIZE", "2")
    env.setenv("MASTER_PORT", "29500")
    assert parallel._ensure_single_process_env() is False
