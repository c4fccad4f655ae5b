"""stability.on_spike=replay at TP2: a one-time fault is classified not reproducible and the run
goes on exactly as an unperturbed one; a poisoned batch is classified reproducible and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.distributed.replay_worker import FAULT_STEP, STEPS

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("replay_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache) -> dict:
    out = tmp_path_factory.mktemp("replay")
    torchrun(WORKER, 2, [str(out), str(data_cache), "clean", "transient", "poisoned"])
    return {mode: [torch.load(out / f"{mode}-rank{r}.pt") for r in range(2)]
            for mode in ("clean", "transient", "poisoned")}


def test_a_transient_fault_is_not_reproducible_and_the_run_continues_unperturbed(results):
    for clean, run in zip(results["clean"], results["transient"], strict=True):
        (event,) = run["events"]
        assert event["verdict"] == "not_reproducible" and event["step"] == FAULT_STEP
        assert event["loss"] > 10 * event["replay_loss"] and "skipped_samples" not in event
        assert [r["step"] for r in run["records"]] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in run["records"]] == [r["loss"] for r in clean["records"]]
        assert run["consumed"] == clean["consumed"]
        for key, value in clean["weights"].items():  # bit for bit: state, RNG, data position
            assert torch.equal(value, run["weights"][key]), key
        assert run["records"][-1]["skipped_steps/replay"] == 1
        assert run["records"][-1]["skipped_steps"] == 1


def test_a_poisoned_batch_is_reproducible_and_skipped(results):
    for clean, run in zip(results["clean"], results["poisoned"], strict=True):
        (event,) = run["events"]
        assert event["verdict"] == "reproducible" and event["step"] == FAULT_STEP
        batch = 4
        assert event["skipped_samples"] == [(FAULT_STEP - 1) * batch, FAULT_STEP * batch]
        by_step = {r["step"]: r for r in run["records"]}
        assert by_step[FAULT_STEP]["update_skipped"] == 1
        assert by_step[FAULT_STEP]["skip_reason"] == "non_finite"
        assert run["consumed"] == clean["consumed"]  # the batch was consumed, not retrained
        # before the fault the runs agree; after it they differ (one update fewer)
        losses = [r["loss"] for r in run["records"]]
        want = [r["loss"] for r in clean["records"]]
        assert losses[:FAULT_STEP - 1] == want[:FAULT_STEP - 1]
        assert losses[FAULT_STEP] != want[FAULT_STEP]
        assert run["records"][-1]["skipped_steps/replay"] == 1
        assert run["records"][-1]["skipped_steps/non_finite"] == 1
