"""Bit-exact resume (TP2, PP2, DP2, DP2 under ZeRO-2 and ZeRO-3, and every stability method
at TP2: those with state of their own by default, the others in the slow target) and
checkpoints that survive a SIGKILL in the middle of a save (also under ZeRO-3), on 2 gloo
processes.

Each case trains 8 steps straight through (run A), and in two process launches: stopped at
step 4 by train.exit_interval (run B), then resumed by the same command in a fresh launch.
Losses, grad norms, learning rates and the final weights of A and B must be identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("resume_worker.py")
COMMON = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1024", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=2", "train.steps=8",
    "train.eval_interval=0", "train.log_interval=1", "metrics.interval=2",
    "checkpoint.interval=3", "logging.tensorboard=false", "logging.progress=false",
]
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": [],
           # ZeRO-2 and ZeRO-3 (the weights partitioned too) at DP2, with the metrics
           "dp2-zero2": ["parallel.zero_stage=2"], "dp2-zero3": ["parallel.zero_stage=3"]}
# The methods with state of their own beyond weights and Adam's (sigma-reparam's u, v and
# sigma; MLRA's factors; Muon's momentum and its partitions) resume in the default target, the
# others in the slow one: their resume is the baseline's (weights, Adam moments, data
# position, RNG).
METHODS = ["mlra", "sigma_reparam", "muon"]
SLOW_METHODS = ["qk_norm", "qk_norm_cap", "qkv_norm", "qk_fc_norm", "soft_cap"]


def method_case(method: str) -> dict:
    return {"recipe": f"recipes/methods/{method}.yaml", "overrides": ["parallel.tp=2"]}


CASES = {
    **{name: {"overrides": o} for name, o in LAYOUTS.items()},
    **{f"tp2-{m}": method_case(m) for m in METHODS},
    # megatron-core's GPTDataset + BlendedDataset over two corpora (data/blend.py), at DP2
    "dp2-blended": {"overrides": [], "blended": True},
}
SLOW_CASES = {f"tp2-{m}": method_case(m) for m in SLOW_METHODS}


def blended_overrides(cache: Path) -> list[str]:
    """The built-in corpus's two prefixes as a 0.3 / 0.7 blend (its validation part has 19
    documents: a 90,10,0 split leaves two of them for validation)."""
    from stable_megatron.data.dataset import prepare_builtin_data

    paths = prepare_builtin_data(cache, vocab_size=1024)
    return ["data.source=blended", f"data.tokenizer_model={paths.tokenizer_model}",
            f"data.blend=[0.3,{paths.train_prefix},0.7,{paths.val_prefix}]",
            "data.split=90,10,0"]


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def case_spec(case: dict, run_dir: Path, cache: Path, *extra: str) -> dict:
    data = blended_overrides(cache) if case.get("blended") else []
    spec = {k: v for k, v in case.items() if k != "blended"}
    return {**spec, "run_dir": str(run_dir),
            "overrides": [*COMMON, f"data.cache_dir={cache}", *data, *case["overrides"],
                          *extra]}


def launch(out: Path, cases: dict, name: str, *args: str, expect_failure: bool = False) -> str:
    spec = out / f"{name}.json"
    spec.write_text(json.dumps(cases))
    try:
        return torchrun(WORKER, 2, [str(out), str(spec), *args], timeout=900)
    except AssertionError as err:
        if expect_failure:
            return str(err)
        raise


def run_resumes(out: Path, cases: dict, cache: Path) -> tuple[Path, str]:
    """Every case's run A and the first half of its run B in one launch, then the second half
    of every run B in another."""
    first, second = {}, {}
    for name, case in cases.items():
        first[f"{name}-A"] = case_spec(case, out / name / "A", cache)
        first[f"{name}-B"] = case_spec(case, out / name / "B", cache, "train.exit_interval=4")
        second[f"{name}-B"] = case_spec(case, out / name / "B", cache)
    launch(out, first, "first")
    return out, launch(out, second, "second")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_cache):
    return run_resumes(tmp_path_factory.mktemp("resume"), CASES, data_cache)


@pytest.fixture(scope="module")
def resumed_slow(tmp_path_factory, data_cache):
    return run_resumes(tmp_path_factory.mktemp("resume-slow"), SLOW_CASES, data_cache)


def weights(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", [*CASES, *(pytest.param(c, marks=pytest.mark.slow)
                                            for c in SLOW_CASES)])
def test_resume_is_bit_exact(request, case):
    out, log = request.getfixturevalue("resumed" if case in CASES else "resumed_slow")
    assert f"case {case}-B: step 8 consumed 32" in log
    a, b = records(out / case / "A"), records(out / case / "B")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "grad_norm", "lr", "consumed_tokens", "loss_mean", "spike_score"):
            if key in a[step]:
                assert a[step][key] == b[step][key], (case, step, key)
        assert all(math.isfinite(a[step][k]) for k in ("loss", "grad_norm"))
    metric_keys = [k for k in a[8] if "/" in k]  # the stability metrics of step 8
    assert metric_keys and all(a[8][k] == b[8][k] for k in metric_keys)
    for wa, wb in zip(weights(out, f"{case}-A"), weights(out, f"{case}-B"), strict=True):
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (case, key)


KILL_POINTS = ["shards", "manifest", "latest"]
# (case, point): every point at TP2, and ZeRO-3 (every rank writes its own shard of the
# weights' optimizer state) killed while the shards are written
KILLS = [*(("tp2", point) for point in KILL_POINTS), ("dp2-zero3", "shards")]


def kill_id(case: str, point: str) -> str:
    return point if case == "tp2" else f"{case}-{point}"


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data_cache, resumed):
    out = tmp_path_factory.mktemp("kill")
    reruns, states = {}, {}
    for case, point in KILLS:
        name = kill_id(case, point)
        spec = {f"kill-{name}": case_spec(CASES[case], out / name, data_cache)}
        launch(out, spec, f"kill-{name}", "--kill", point, expect_failure=True)
        ckpt = out / name / "checkpoints"
        states[name] = {
            "latest": (ckpt / "latest").read_text().strip(),
            "entries": sorted(p.name for p in ckpt.iterdir()),
        }
        reruns.update(spec)
    log = launch(out, reruns, "rerun")
    return out, states, log


@pytest.mark.parametrize("case, point", KILLS)
def test_sigkill_during_save_loses_nothing(killed, resumed, case, point):
    out, states, log = killed
    name = kill_id(case, point)
    state = states[name]
    # Killed while saving step 6: the step-3 checkpoint is untouched and `latest` names it.
    assert state["latest"] == "step00000003"
    if point == "latest":  # renamed into place, complete, `latest` not yet rewritten
        assert state["entries"] == [".tmp-step00000006", "latest", "step00000003",
                                    "step00000006"]
    else:
        assert state["entries"] == [".tmp-step00000006", "latest", "step00000003"]
    # The same command again: resumes from the newest complete checkpoint, no cleanup needed.
    resumed_at = 6 if point == "latest" else 3
    assert f"resumed at step {resumed_at} from {out / name / 'checkpoints'}" in log
    assert f"case kill-{name}: step 8 consumed 32" in log
    ckpt = out / name / "checkpoints"
    assert not any(p.name.startswith(".tmp") for p in ckpt.iterdir())
    assert (ckpt / "latest").read_text().strip() == "step00000008"
    # ... and ends exactly where the uninterrupted run did.
    ref_out = resumed[0]
    want, got = records(ref_out / case / "A"), records(out / name)
    for step in range(resumed_at + 1, 9):
        assert got[step]["loss"] == want[step]["loss"], (name, step)
    for wa, wb in zip(weights(ref_out, f"{case}-A"), weights(out, f"kill-{name}"), strict=True):
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)


def test_zero3_checkpoint_reads_as_the_trained_weights(resumed):
    """The layer files of a ZeRO-3 checkpoint are written from the gathered weights: `inspect`,
    `export` and `generate` read (`view.merged_state_dict`) exactly the weights the run
    trained, as at any other stage."""
    from stable_megatron.checkpoint import view

    out, _ = resumed
    merged = view.merged_state_dict(view.open_checkpoint(out / "dp2-zero3" / "A" / "checkpoints"))
    trained = weights(out, "dp2-zero3-A")[0]  # rank 0, gathered (TP1: whole tensors)
    # the transformer layers' tensors (blocks 1 and 2) under the same keys in both
    layers = [k for k, v in merged.items()
              if k.split(".")[0] in ("1", "2") and torch.is_tensor(v)]
    assert layers and set(layers) <= set(trained)
    for key in layers:
        assert torch.equal(merged[key], trained[key]), key
