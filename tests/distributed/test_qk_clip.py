"""QK-clip at TP2 x DP2 with ZeRO-1 (the worker's docstring has the procedure): after a clipping
step the clipped heads' largest logit on the same batch is tau, the other heads' is unchanged,
only the clipped heads' q and k entries changed, and every fp32 master fragment equals the
module's weights, so that the next update starts from the clipped weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.distributed.test_parity import case

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("qk_clip_worker.py")
CASES = {
    "standard": {"qk_clip": {"enabled": True}},
    "mlra": {"qk_clip": {"enabled": True}, "attention": "mlra",
             "mlra": {"targets": ["q", "v"], "rank": 4}},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qk_clip")
    cases = {name: case({"tp": 2}, model) for name, model in CASES.items()}
    torchrun(WORKER, 4, [str(tmp), json.dumps(cases)])
    return {name: [torch.load(tmp / name / f"rank{r}.pt") for r in range(4)] for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_clipped_heads_reach_tau_and_the_rest_is_unchanged(results, name):
    ranks = results[name]
    """On each attention's own inputs of the clipping step, the clipped heads' maximum is tau
    and the others' unchanged. A whole forward of the batch agrees in the first layer only:
    the clip of a layer changes the inputs of the layers after it."""
    ranks = results[name]
    measured, tau = ranks[0]["measured"], ranks[0]["tau"]
    for r in ranks:  # every rank holds the whole table after the all-reduce
        assert torch.equal(r["measured"], measured) and r["tau"] == tau
        assert torch.equal(r["measured_again"], measured)  # LR 0: the update changed nothing
        assert torch.equal(r["after_same_inputs"], ranks[0]["after_same_inputs"])
    assert torch.isfinite(measured).all()
    clipped = measured > tau
    assert clipped.any() and not clipped.all()
    assert clipped[0].any() and clipped[1:].any()
    for after in (ranks[0]["after_same_inputs"], ranks[0]["after"][:1]):
        hit = clipped[:after.size(0)]
        torch.testing.assert_close(after[hit], torch.full_like(after[hit], tau),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(after[~hit], measured[:after.size(0)][~hit],
                                   rtol=1e-6, atol=0)
    first, second = ranks[0]["records"]
    assert first["qk_clip/clipped_heads"] == 0
    assert first["qk_clip/max_logit"] == pytest.approx(float(measured.max()), rel=1e-6)
    assert second["qk_clip/clipped_heads"] == int(clipped.sum())


@pytest.mark.parametrize("name", list(CASES))
def test_zero_master_weights_follow_the_clip(results, name):
    for r in results[name]:
        assert r["fragments"] > 0
        assert r["master_equal"], f"rank {r['layout']}: fp32 master differs from the module"


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_clipped_heads_query_and_key_entries_change(results, name):
    for r in results[name]:
        before, after, qkv = r["before_clip"], r["after_clip"], r["qkv_params"]
        for param in before:
            if param not in qkv:
                assert torch.equal(after[param]["value"], before[param]["value"]), param
        if name != "standard":
            continue
        measured, tau = r["measured"], r["tau"]
        heads_local = measured.size(1) // r["layout"]["tp"]
        for param, layer in qkv.items():
            old, new = before[param]["value"], after[param]["value"]
            old = old.reshape(heads_local, 3, -1)
            new = new.reshape(heads_local, 3, -1)
            for j in range(heads_local):
                head = r["layout"]["tp_rank"] * heads_local + j
                m = float(measured[layer - 1, head])
                if m > tau:
                    factor = math.sqrt(tau / m)
                    torch.testing.assert_close(new[j, :2], old[j, :2] * factor,
                                               rtol=1e-6, atol=0)
                    assert torch.equal(new[j, 2], old[j, 2])  # v
                else:
                    assert torch.equal(new[j], old[j]), (param, head)
