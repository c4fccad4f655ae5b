"""Every logged stability metric has the same value at TP1, TP2, PP2, TP2xPP2, DP2, and DP2 and
TP2xDP2 under ZeRO-3, as in a single process, for the same model and data (fp32 tolerance):
the reductions in stable_megatron/metrics/reduce.py make rank 0's numbers independent of the
layout. So do the
spike guard's loss statistics (`loss_mean`, `loss_std`, `spike_score`, `grad_norm_score`),
which it computes on every step from its own all-reduce of the loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("metrics_worker.py")
BASE = {
    "data": {"vocab_size": 200},
    "model": {
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 32,
    },
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 0},
    "metrics": {"interval": 2, "sigma_exact_iters": 30},
    "stability": {"min_history": 2},  # spike statistics from step 3 on
    "steps": 4,
}
SPIKE_KEYS = ("loss_mean", "loss_std", "spike_score", "grad_norm_score")
LOSS_RTOL, GRAD_RTOL = 2e-6, 1e-5  # how closely losses and grad norms agree across layouts
# baseline: tied embeddings, SDPA kernel outside the logging steps. methods: untied head
# (tev_out), softmax cap (capped logits, math kernel), Proj/FC2 output norms around MLRA's
# projections, sigma-reparam on FC1/FC2 (sigma, gamma, sigma_exact, sigma_lag), z-loss (its term
# on every step; the output-logit statistics are logged for both models).
MODELS = {
    "baseline": {},
    "methods": {
        "tie_embeddings": False, "softmax_cap": 5.0, "norm_placement": "qk_fc_norm",
        "attention": "mlra", "mlra": {"targets": ["q", "k", "v", "o"], "rank": 4},
        "sigma_reparam": {"enabled": True, "targets": ["fc1", "fc2"], "init_iters": 100},
        "z_loss": 0.01,
    },
}
LAUNCHES = {  # processes -> layouts run in one launch
    # ZeRO-3: every weight the metrics read (TEV, norms, updates, sigma) partitioned over DP
    2: {"tp2": {"tp": 2}, "pp2": {"pp": 2}, "dp2": {}, "dp2_zero3": {"zero_stage": 3}},
    4: {"tp2_pp2": {"tp": 2, "pp": 2}, "tp2_dp2_zero3": {"tp": 2, "zero_stage": 3}},
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
    return set(record) - {"step", "loss", "engine_grad_norm", "guard_loss", "guard_grad_norm",
                          "z_loss", *SPIKE_KEYS}


def test_reference_logs_every_family(reference):
    """Metrics on logging steps only, every family present, finite and non-trivial."""
    for model, records in reference.items():
        assert [bool(metric_keys(r)) for r in records] == [False, True, False, True], model
        logged = records[1]
        families = {k.split("/")[0] for k in metric_keys(logged)}
        expected = {"tev", "attn_entropy", "attn_entropy_norm", "attn_logit_max", "out_norm",
                    "grad_norm", "param_norm", "output_logit", "update_ratio", "update_rms"}
        if model == "methods":
            expected |= {"tev_out", "attn_logit_max_capped", "sigma", "gamma", "sigma_exact",
                         "sigma_lag"}
        assert families == expected, model
        assert all(math.isfinite(logged[k]) for k in metric_keys(logged)), model
        assert len([k for k in logged if k.startswith("attn_entropy/")]) == 4 * 4 + 4
        assert len([k for k in logged if k.startswith("out_norm/")]) == 4 * 4
        assert logged["grad_norm/total"] == pytest.approx(logged["engine_grad_norm"], rel=1e-5)
        assert logged["output_logit/max"] > logged["output_logit/mean"]
        # z-loss: its term on every step, and only with model.z_loss > 0
        assert all(("z_loss" in r) == (model == "methods") for r in records), model
        if model == "methods":
            assert all(0 < r["z_loss"] < r["loss"] for r in records)
        check_spike_statistics(records, records, model)  # present from step 3, consistent


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
        for step, (r, want) in enumerate(zip(records, reference[model], strict=True), 1):
            assert ("z_loss" in r) == ("z_loss" in want), (layout, model, step)
            if "z_loss" in want:  # as closely as the losses themselves agree
                assert r["z_loss"] == pytest.approx(want["z_loss"], rel=LOSS_RTOL * 10)
        check_spike_statistics(records, reference[model], f"{layout} {model}")


def moments(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation, as the spike detector defines them."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def check_spike_statistics(records: list[dict], ref: list[dict], where: str) -> None:
    """The guard's own all-reduced loss and grad norm equal the step's; its running statistics
    are those of its earlier steps (recomputed here) and match the single process's. The
    tolerances follow from the fp32 agreement of losses (LOSS_RTOL) and grad norms
    (GRAD_RTOL) across layouts: an error e in the values moves a mean or std by about e and a
    score (value - mean) / std by up to about 4 e / std."""
    for i, (got, want) in enumerate(zip(records, ref, strict=True)):
        step = got["step"]
        assert got["guard_loss"] == pytest.approx(got["loss"], rel=1e-6), (where, step)
        assert got["guard_grad_norm"] == pytest.approx(got["engine_grad_norm"], rel=1e-6)
        assert got["guard_loss"] == pytest.approx(want["guard_loss"], rel=LOSS_RTOL), step
        assert got["guard_grad_norm"] == pytest.approx(want["guard_grad_norm"], rel=GRAD_RTOL)
        scored = step > BASE["stability"]["min_history"]
        assert set(SPIKE_KEYS) <= set(got) if scored else not set(SPIKE_KEYS) & set(got), step
        if not scored:
            continue
        mean, std = moments([r["guard_loss"] for r in records[:i]])
        g_mean, g_std = moments([r["guard_grad_norm"] for r in records[:i]])
        assert (got["loss_mean"], got["loss_std"]) == pytest.approx((mean, std), rel=1e-9)
        assert got["spike_score"] == pytest.approx((got["guard_loss"] - mean) / std, rel=1e-9)
        assert got["grad_norm_score"] == pytest.approx(
            (got["guard_grad_norm"] - g_mean) / g_std, rel=1e-9)
        loss_err, grad_err = LOSS_RTOL * want["loss_mean"], GRAD_RTOL * want["guard_grad_norm"]
        _, want_g_std = moments([r["guard_grad_norm"] for r in ref[:i]])
        expected = {
            "loss_mean": loss_err, "loss_std": loss_err,
            "spike_score": 4 * loss_err / want["loss_std"],
            "grad_norm_score": 4 * grad_err / want_g_std,
        }
        for key, tol in expected.items():
            assert got[key] == pytest.approx(want[key], rel=0, abs=tol), (where, step, key)
