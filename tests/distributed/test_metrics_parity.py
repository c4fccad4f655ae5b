"""Every logged stability metric has the same value at TP1, TP2, PP2, TP2xPP2 and DP2 as in a
single process, for the same model and data (fp32 tolerance): the reductions in
stable_megatron/metrics/reduce.py make rank 0's numbers independent of the layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("metrics_worker.py")
BASE = {
    "model": {
        "vocab_size": 200, "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 32,
    },
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 0},
    "metrics": {"interval": 2},
    "steps": 3,
}
# baseline: tied embeddings, SDPA kernel outside the logging steps. methods: untied head
# (tev_out), softmax cap (capped logits, math kernel), Proj/FC2 output norms around MLRA's
# projections, sigma-reparam on FC1/FC2 (sigma, gamma).
MODELS = {
    "baseline": {},
    "methods": {
        "tie_embeddings": False, "softmax_cap": 5.0, "norm_placement": "qk_fc_norm",
        "attention": "mlra", "mlra": {"targets": ["q", "k", "v", "o"], "rank": 4},
        "sigma_reparam": {"enabled": True, "targets": ["fc1", "fc2"], "init_iters": 100},
    },
}
LAUNCHES = {  # processes -> layouts run in one launch
    2: {"tp2": {"tp": 2}, "pp2": {"pp": 2}, "dp2": {}},
    4: {"tp2_pp2": {"tp": 2, "pp": 2}},
}
TIMEOUT = 300  # watchdog per launch (seconds)


def case(parallel: dict, model: dict) -> dict:
    overrides = json.loads(json.dumps(BASE))
    overrides["parallel"] = parallel
    overrides["model"].update(model)
    return overrides


def run(tmp: Path, nproc: int, layouts: dict[str, dict]) -> dict[tuple[str, str], list[dict]]:
    cases = {f"{layout}-{model}": case(par, spec)
             for layout, par in layouts.items() for model, spec in MODELS.items()}
    torchrun(WORKER, nproc, [str(tmp), json.dumps(cases)], timeout=TIMEOUT)
    return {tuple(name.split("-")): json.loads((tmp / f"{name}.json").read_text())
            for name in cases}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    results = run(tmp_path_factory.mktemp("ref"), 1, {"tp1": {}})
    return {model: records for (_, model), records in results.items()}


def metric_keys(record: dict) -> set[str]:
    return set(record) - {"step", "loss", "engine_grad_norm"}


def test_reference_logs_every_family(reference):
    """Metrics on logging steps only, every family present, finite and non-trivial."""
    for model, records in reference.items():
        assert [bool(metric_keys(r)) for r in records] == [False, True, False], model
        logged = records[1]
        families = {k.split("/")[0] for k in metric_keys(logged)}
        expected = {"tev", "attn_entropy", "attn_entropy_norm", "attn_logit_max", "out_norm",
                    "grad_norm", "param_norm"}
        if model == "methods":
            expected |= {"tev_out", "attn_logit_max_capped", "sigma", "gamma"}
        assert families == expected, model
        assert all(math.isfinite(logged[k]) for k in metric_keys(logged)), model
        assert len([k for k in logged if k.startswith("attn_entropy/")]) == 4 * 4 + 4
        assert len([k for k in logged if k.startswith("out_norm/")]) == 4 * 4
        assert logged["grad_norm/total"] == pytest.approx(logged["engine_grad_norm"], rel=1e-5)


@pytest.mark.parametrize("nproc", list(LAUNCHES))
def test_metrics_match_single_process(nproc, reference, tmp_path):
    results = run(tmp_path, nproc, LAUNCHES[nproc])
    for (layout, model), records in results.items():
        ref = reference[model][1]
        got = records[1]
        assert metric_keys(got) == metric_keys(ref), (layout, model)
        bad = {k: (got[k], ref[k]) for k in metric_keys(ref)
               if not got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-7)}
        assert not bad, f"{layout} {model}: {bad}"
        assert not metric_keys(records[0]) and not metric_keys(records[2])
