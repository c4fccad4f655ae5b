"""Reshape: a checkpoint saved at TP2 x PP2 (world 4) resumed at TP1 x PP1 (world 1) and at DP2
(world 2), through DeepSpeed's universal checkpoint (stable_megatron/reshape.py).

Run A trains 5 steps at TP2 x PP2 with checkpoints at steps 2 and 4. Each resumed run loads
the step-2 checkpoint at another layout and trains steps 3 and 4: the first loss after the
resume (step 3) must equal run A's step-3 loss (fp32 tolerance; it depends on the weights and,
for sigma-reparam, on the power-iteration vectors `u`/`v`, which are not in DeepSpeed's
universal format and are resharded by us); step 4 checks the restored Adam moments and LR
schedule. The baseline runs by default; sigma-reparam, MLRA, TP2 / PP2 targets, weights-only
finetuning at another layout, and a second reshape (TP2 x PP2 -> TP2 -> TP1: step 5 from the
TP2 run's own step-4 checkpoint) are `slow`. Process launches: 4, 2 and 1 processes (several
trainings per launch).

Every conversion is written under the loading run's own checkpoint directory: the source run's
directory (reached through `checkpoint.load`) is left byte-for-byte unchanged.

Also: a checkpoint without DeepSpeed's universal_checkpoint_info and a layout the model cannot
take are refused with one clear line; the offline command (tools/reshape_checkpoint.py); and,
in one process, every parameter of every stability method is classified exactly once (the
patterns from a meta-device build against a real build's megatron-core attributes) and the
resharding rules for parameters, buffers and the padded vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("reshape_worker.py")
COMMON = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1024", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=2", "train.steps=5",
    "train.eval_interval=0", "train.log_interval=1", "metrics.interval=0",
    "checkpoint.interval=2", "logging.tensorboard=false", "logging.progress=false",
]
SOURCE = ["parallel.tp=2", "parallel.pp=2"]  # world 4
TARGETS = {1: {"tp1": []}, 2: {"dp2": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}}
RECIPES = {
    "base": "recipes/tiny.yaml",
    "sigma": "recipes/methods/sigma_reparam.yaml",
    "mlra": "recipes/methods/mlra.yaml",
    "llama": "recipes/llama_style/tiny.yaml",  # SwiGLU's FC1: DeepSpeed's 2-sub-param merge
    "muon": "recipes/methods/muon.yaml",  # Muon's momentum in Adam's exp_avg slot
}
RTOL = 1e-5
RESUME_STEP = 2


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def launch(out: Path, cases: dict, nproc: int, name: str) -> str:
    spec = out / f"{name}.json"
    spec.write_text(json.dumps(cases))
    return torchrun(WORKER, nproc, [str(out), str(spec)], timeout=900)


def case(method: str, run_dir: Path, cache: Path, *extra: str, **flags) -> dict:
    return {"recipe": RECIPES[method], "run_dir": str(run_dir), **flags,
            "overrides": [*COMMON, f"data.cache_dir={cache}", *extra]}


def source_tag(out: Path, method: str) -> Path:
    return out / f"{method}-A" / "checkpoints" / f"step{RESUME_STEP:08d}"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (its SHA-256) and directory under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "<dir>" for p in sorted(root.rglob("*"))}


def run_all(out: Path, cache: Path, methods: list[str], targets: dict[int, list[str]],
            extra: bool) -> dict:
    """Launch 4 processes (the sources), then 2, then 1 (the reshaped resumes). Returns the
    logs by world size, and the source runs' digests before and after the resumes."""
    first = {f"{m}-A": case(m, out / f"{m}-A", cache, *SOURCE) for m in methods}
    if extra:  # weights only, at the saved layout: the reference of the reshaped finetune
        first["base-ft-A"] = case("base", out / "base-ft-A", cache, *SOURCE, "train.steps=1",
                                  f"checkpoint.load={source_tag(out, 'base')}",
                                  "checkpoint.finetune=true")
    logs = {4: launch(out, first, 4, "world4")}
    before = {m: tree_digest(out / f"{m}-A") for m in methods}
    for world in (2, 1):
        cases = {}
        for m in methods:
            for target in targets[world]:
                cases[f"{m}-{target}"] = case(m, out / f"{m}-{target}", cache,
                                              *TARGETS[world][target], "train.exit_interval=2",
                                              f"checkpoint.load={source_tag(out, m)}")
        if world == 2:
            # saved without DeepSpeed's universal_checkpoint_info (an older checkpoint)
            cases["noinfo"] = case("base", out / "noinfo", cache, "parallel.tp=2",
                                   "train.steps=2", no_universal_info=True)
        if world == 1:
            cases["noinfo-tp1"] = case("base", out / "noinfo-tp1", cache,
                                       f"checkpoint.load={out / 'noinfo' / 'checkpoints'}",
                                       expect_error=True)
        if extra and world == 2:
            cases["base-ft-dp2"] = case("base", out / "base-ft-dp2", cache, "train.steps=1",
                                        f"checkpoint.load={source_tag(out, 'base')}",
                                        "checkpoint.finetune=true")
        if extra and world == 1:  # the reshaped TP2 run's own step-4 checkpoint, at TP1
            cases["base-tp2-tp1"] = case("base", out / "base-tp2-tp1", cache,
                                         f"checkpoint.load={out / 'base-tp2' / 'checkpoints'}")
        logs[world] = launch(out, cases, world, f"world{world}")
    after = {m: tree_digest(out / f"{m}-A") for m in methods}
    return {**logs, "sources": (before, after)}


@pytest.fixture(scope="module")
def fast(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("reshape")
    logs = run_all(out, data_cache, ["base", "llama", "muon"], {1: ["tp1"], 2: ["dp2"]},
                   extra=False)
    return out, logs


@pytest.fixture(scope="module")
def full(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("reshape-full")
    logs = run_all(out, data_cache, ["sigma", "mlra", "base"],
                   {1: ["tp1"], 2: ["dp2", "tp2", "pp2"]}, extra=True)
    return out, logs


def check_resumed(out: Path, method: str, target: str) -> None:
    want, got = records(out / f"{method}-A"), records(out / f"{method}-{target}")
    assert sorted(want) == [1, 2, 3, 4, 5]
    assert sorted(got) == [3, 4], (method, target)  # resumed at step 2
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            assert math.isfinite(got[step][key])
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12)
        assert got[step]["consumed_tokens"] == want[step]["consumed_tokens"]


@pytest.mark.parametrize("target", ["tp1", "dp2"])
def test_llama_style_reshape_matches_original_layout(fast, target):
    """TP2 x PP2 -> TP1 merges SwiGLU's stride-2 FC1 slices (and its Adam moments) through
    DeepSpeed's universal checkpoint; the resumed losses are the original run's."""
    check_resumed(fast[0], "llama", target)


@pytest.mark.parametrize("target", ["tp1", "dp2"])
def test_muon_reshape_matches_original_layout(fast, target):
    """TP2 x PP2 -> TP1 and -> DP2 with Muon: its momentum (partitioned by ZeRO like Adam's
    moments) is merged and re-partitioned; the resumed losses are the original run's."""
    check_resumed(fast[0], "muon", target)


@pytest.mark.parametrize("target", ["tp1", "dp2"])
def test_baseline_reshape_matches_original_layout(fast, target):
    out, logs = fast
    check_resumed(out, "base", target)
    tag = source_tag(out, "base")
    world = 1 if target == "tp1" else 2
    assert f"reshaped {tag} from tp 2 x pp 2 x dp 1 (ZeRO-1) to " in logs[world]
    assert "RNG states are not restored at another layout" in logs[world]
    # converted by the loading run, under its own checkpoint directory
    assert f"converted {tag} to DeepSpeed's universal format" in logs[world]
    cache = out / f"base-{target}" / "checkpoints" / ".reshape"
    (converted,) = cache.glob("step00000002-*")
    assert (converted / "universal" / "stable_megatron_universal.json").is_file()
    assert not (converted / ".tmp-universal").exists()
    assert sorted(p.name for p in (converted / "source").iterdir()) == sorted(
        p.name for p in tag.iterdir() if p.name.endswith("model_states.pt")
    ) + ["stable_megatron.json"]  # the verified copies it was converted from (no optimizer)


def test_reshape_leaves_the_source_run_unchanged(fast):
    out, logs = fast
    before, after = logs["sources"]
    assert before["base"] and "checkpoints/step00000002/universal" not in after["base"]
    assert after["base"] == before["base"]


def test_checkpoint_without_universal_info_is_refused_clearly(fast):
    out, logs = fast
    message = (out / "noinfo-tp1-error.txt").read_text()
    assert ("saved at tp 2 x pp 1 x dp 1 (ZeRO-1), this run is tp 1 x pp 1 x dp 1 (ZeRO-1)"
            in message)
    assert "no universal_checkpoint_info" in message
    assert "checkpoint.finetune=true" in message


# ZeRO stages: a ZeRO-3 checkpoint at DP2 resumed at TP2 under ZeRO-1 and at TP1 (one process,
# ZeRO-1); a TP2 ZeRO-1 checkpoint resumed at DP2 under ZeRO-3; refused: into ZeRO-3 at TP2
# (DeepSpeed's ZeRO-3 universal loader does not split over TP), and a ZeRO-0 checkpoint
# elsewhere (its optimizer state is not in ZeRO's files).
ZERO_SOURCES = {"z3": ["parallel.zero_stage=3"], "tp2z1": ["parallel.tp=2"],
                "z0": ["parallel.zero_stage=0"]}
FINETUNE = ["checkpoint.finetune=true", "train.steps=1"]
ZERO_TARGETS = {2: {"z3-tp2": ("z3", ["parallel.tp=2"]),
                    "tp2z1-z3": ("tp2z1", ["parallel.zero_stage=3"]),
                    "tp2z1-z3tp2": ("tp2z1", ["parallel.zero_stage=3", "parallel.tp=2"]),
                    # weights only into ZeRO-3: at the saved layout and stage, and from TP2 ZeRO-1
                    "z3-ft": ("z3", ["parallel.zero_stage=3", *FINETUNE]),
                    "tp2z1-ftz3": ("tp2z1", ["parallel.zero_stage=3", *FINETUNE])},
                1: {"z3-tp1": ("z3", []), "z0-tp1": ("z0", []), "z3-ft1": ("z3", FINETUNE)}}
ZERO_REFUSED = ("tp2z1-z3tp2", "z0-tp1")


@pytest.fixture(scope="module")
def zero(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("reshape-zero")
    sources = {f"{name}-A": case("base", out / f"{name}-A", data_cache, *extra)
               for name, extra in ZERO_SOURCES.items()}
    logs = {"sources": launch(out, sources, 2, "zero-sources")}
    for world, targets in ZERO_TARGETS.items():
        cases = {name: case("base", out / name, data_cache, *extra, "train.exit_interval=2",
                            f"checkpoint.load={source_tag(out, source)}",
                            expect_error=name in ZERO_REFUSED)
                 for name, (source, extra) in targets.items()}
        logs[world] = launch(out, cases, world, f"zero-world{world}")
    return out, logs


@pytest.mark.parametrize("source, target", [("z3", "tp2"), ("z3", "tp1"), ("tp2z1", "z3")])
def test_zero_stage_reshape_matches_original_run(zero, source, target):
    """Another ZeRO stage and layout, through the universal checkpoint: the resumed losses,
    grad norms and LR are the source run's (steps 3 and 4: the weights, Adam's moments and
    step, the LR schedule and, at step 4, the per-group weight decay)."""
    out, logs = zero
    check_resumed(out, source, target)
    world = 1 if target == "tp1" else 2
    assert f"reshaped {source_tag(out, source)} from " in logs[world]


def test_weights_only_into_and_out_of_zero3(zero):
    """`checkpoint.finetune=true` under ZeRO-3 (the layer files read into the gathered weights,
    the fp32 master refreshed) and out of it: the first loss of the three starts is the same
    (the loaded step-2 weights on batch 0), and below a fresh model's."""
    out, _ = zero
    firsts = [records(out / name)[1]["loss"] for name in ("z3-ft", "tp2z1-ftz3", "z3-ft1")]
    for loss in firsts[1:]:
        assert loss == pytest.approx(firsts[0], rel=RTOL)
    assert firsts[0] < records(out / "z3-A")[1]["loss"]


def test_zero_stage_reshapes_that_cannot_work_are_refused_clearly(zero):
    out, _ = zero
    message = (out / "tp2z1-z3tp2-error.txt").read_text()
    assert "into ZeRO-3 needs parallel.tp=1" in message and "(ZeRO-3)" in message
    message = (out / "z0-tp1-error.txt").read_text()
    assert "uses ZeRO stage 0" in message and "checkpoint.finetune=true" in message


def test_layout_that_cannot_hold_the_model_is_refused_clearly():
    from stable_megatron.config import ConfigError, load_config, validate

    cfg = load_config(ROOT / "recipes" / "tiny.yaml", [*COMMON, "parallel.tp=3"])
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by "
                                          r"parallel.tp=3; valid tp: 1, 2, 4"):
        validate(cfg, 3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sigma", "mlra", "base"])
@pytest.mark.parametrize("target", ["tp1", "dp2", "tp2", "pp2"])
def test_methods_reshape_matches_original_layout(full, method, target):
    check_resumed(full[0], method, target)


@pytest.mark.slow
def test_finetune_at_another_layout_loads_the_weights(full):
    out, _ = full
    want, got = records(out / "base-ft-A"), records(out / "base-ft-dp2")
    assert sorted(want) == sorted(got) == [1]
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], rel=RTOL)
    assert got[1]["grad_norm"] == pytest.approx(want[1]["grad_norm"], rel=RTOL)
    # and it is the trained model (step 3 of run A sees other samples: only a sanity bound)
    assert got[1]["loss"] < records(out / "base-A")[1]["loss"]


@pytest.mark.slow
def test_reshaped_run_checkpoint_reshapes_again(full):
    out, _ = full
    want, got = records(out / "base-A"), records(out / "base-tp2-tp1")
    assert sorted(got) == [5]
    for key in ("loss", "grad_norm", "lr"):
        assert got[5][key] == pytest.approx(want[5][key], rel=RTOL), key


# --------------------------------------------------------------------------------------------
# The offline conversion command


def run_tool(*args: str):
    from tests.scripts import run_script

    return run_script(ROOT / "tools" / "reshape_checkpoint.py", *args)


def test_offline_conversion_command(fast):
    out, _ = fast
    tag = out / "base-A" / "checkpoints" / "step00000004"  # not converted by the resumes
    into = out / "offline" / "checkpoints"  # the checkpoint directory of the run to load it
    source = tree_digest(tag.parent)
    proc = run_tool(str(tag), "--into", str(into))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (cache,) = (into / ".reshape").glob("step00000004-*")
    universal = cache / "universal"
    assert proc.stdout.strip() == (f"{universal}: step 4, saved at tp 2 x pp 2 x dp 1; a run "
                                   f"with checkpoint.dir={into} loads it at any layout from "
                                   f"checkpoint.load={tag}")
    assert (universal / "stable_megatron_universal.json").is_file()
    assert (universal / "zero" / "3.norm.weight" / "fp32.pt").is_file()
    again = run_tool(str(tag), "--into", str(into))
    assert again.stdout.strip() == f"{universal}: already converted (--force converts again)"
    assert tree_digest(tag.parent) == source
    refused = run_tool(str(out / "noinfo" / "checkpoints"))  # its latest checkpoint
    assert refused.returncode == 2 and refused.stdout == ""
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "has no universal_checkpoint_info" in last


# --------------------------------------------------------------------------------------------
# How parameters and buffers are split (single process)

VARIANTS = {
    **{p.stem: (f"recipes/methods/{p.name}", [])
       for p in sorted((ROOT / "recipes" / "methods").glob("*.yaml"))},
    "mlra-qo-untied": ("recipes/methods/mlra.yaml",
                       ["model.mlra.targets=[q,o]", "model.tie_embeddings=false"]),
    "mlra-o-sigma": ("recipes/methods/mlra.yaml",
                     ["model.mlra.targets=[o]", "model.sigma_reparam.enabled=true",
                      "model.sigma_reparam.targets=[qkv,fc1,fc2]"]),
    "qk_fc_norm-sigma-rope": ("recipes/methods/qk_fc_norm.yaml",
                              ["model.sigma_reparam.enabled=true",
                               "model.position_embedding=rope", "model.softmax_cap=30"]),
    "no-bias-untied": ("recipes/tiny.yaml",
                       ["model.add_bias_linear=false", "model.tie_embeddings=false"]),
    "llama_style": ("recipes/llama_style/tiny.yaml", []),
    "llama-bias-sigma-qk_fc_norm": ("recipes/llama_style/tiny.yaml",
                                    ["model.add_bias_linear=true",
                                     "model.norm_placement=qk_fc_norm",
                                     "model.sigma_reparam.enabled=true"]),
}
# name fragments whose kind is known from the method's definition
EXPECTED = [
    ("word_embeddings.weight", "vocab"), ("output_layer.weight", "vocab"),
    ("position_embeddings.weight", "replicated"), ("norm.", "replicated"),
    ("layernorm.", "replicated"), (".gamma", "replicated"), ("lowrank_b", "column"),
    ("linear_proj.weight", "row"), ("linear_proj.linear.weight", "row"),
    ("linear_fc2.weight", "row"), ("linear_fc2.linear.weight", "row"),
    ("linear_proj.bias", "replicated"), ("linear_fc2.bias", "replicated"),
    ("linear_proj.linear.bias", "replicated"), ("linear_fc2.linear.bias", "replicated"),
    ("linear_qkv.weight", "column"), ("linear_qkv.bias", "column"),
    ("lowrank_a.weight", "column"), ("full.weight", "column"), ("linear_fc1.", "column"),
    ("linear_gate.", "column"),
]


def small_config(recipe: str, overrides: list[str]):
    from stable_megatron.config import load_config

    cfg = load_config(ROOT / recipe, [*COMMON, *overrides])
    cfg.model.vocab_size = 1000  # padded: 1024 at tp 1 and 2, 1536 at tp 3 (not a layout)
    return cfg




@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_is_classified_exactly_once(one_process, variant):
    """The patterns (from a meta-device build) against a real CPU build's megatron-core
    attributes: each parameter matches exactly one pattern, of its own kind; every pattern
    matches (DeepSpeed's converter asserts that no pattern goes unused)."""
    import re

    import torch
    from deepspeed.checkpoint import constants as c

    from stable_megatron.checkpoint import reshape, shards
    from stable_megatron.model.gpt import build_model

    cfg = small_config(*VARIANTS[variant])
    patterns = reshape.parameter_patterns(cfg)
    model = build_model(cfg, one_process.topology, torch.device("cpu"))
    real = shards.classify(model)
    assert set(real) == {name for name, _ in model.named_parameters()}
    used = set()
    for name, kind in real.items():
        matched = [(k, p) for k, ps in patterns.items() for p in ps if re.match(p, name)]
        assert len(matched) == 1 and matched[0][0] == kind, (name, kind, matched)
        used.add(matched[0][1])
        for fragment, expected in EXPECTED:
            if fragment in name:
                if fragment == "linear_fc1." and cfg.model.activation == "swiglu":
                    expected = "column_glu"  # [gate; up], split with stride 2
                assert kind == expected, (name, kind, fragment)
                break
        else:
            raise AssertionError(f"{name}: no expectation for its kind ({kind})")
    assert used == {p for ps in patterns.values() for p in ps}
    info = reshape.universal_checkpoint_info(cfg)
    assert info[c.TP_REPLICATED_PARAMETER_PATTERNS] == patterns["replicated"]
    assert info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] == patterns["row"]
    assert info[c.VOCABULARY_PARAMETER_PATTERNS] == patterns["vocab"]
    assert info[c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] == patterns["column_glu"]
    assert bool(patterns["column_glu"]) == (cfg.model.activation == "swiglu")
    assert info[c.ORIGINAL_VOCAB_SIZE] == 1024
    tied = [n for n in real if n.startswith("tied_modules.")]
    assert bool(tied) == cfg.model.tie_embeddings
    assert info[c.PIPELINE_REPLICATED_PARAMETER_PATTERNS] == sorted(
        {reshape.name_pattern(n) for n in tied})
    # the sigma-reparam buffers (not in DeepSpeed's universal format) are per block
    buffers = [n for n, _ in model.named_buffers()]
    assert bool(buffers) == cfg.model.sigma_reparam.enabled
    assert all(n.endswith((".u", ".v")) for n in buffers)


def test_reshard_rules():
    import torch

    from stable_megatron.checkpoint import CheckpointError
    from stable_megatron.checkpoint.shards import reshard

    full = torch.arange(48.0).reshape(8, 6)
    col, row = list(full.chunk(2, dim=0)), list(full.chunk(2, dim=1))
    assert torch.equal(reshard(col, (8, 6), 0, 1, "column"), full)
    assert torch.equal(reshard(row, (8, 6), 0, 1, "row"), full)
    assert torch.equal(reshard([full], (2, 6), 3, 4, "column"), full[6:])
    assert torch.equal(reshard(row, (8, 2), 1, 3, "row"), full[:, 2:4])
    assert torch.equal(reshard([full, full], (8, 6), 0, 1, "replicated"), full)
    # SwiGLU's FC1: the full tensor is [gate; up]; each rank holds [its gate rows; its up rows]
    gate, up = full[:4], full[4:]
    glu = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]
    assert torch.equal(reshard(glu, (8, 6), 0, 1, "column_glu"), full)
    assert torch.equal(reshard([full], (4, 6), 1, 2, "column_glu"), glu[1])
    quarter = reshard(glu, (2, 6), 3, 4, "column_glu")
    assert torch.equal(quarter, torch.cat([gate[3:], up[3:]]))
    # buffers: by shape (split along the dim that differs; same TP size: the same shard)
    vec = torch.arange(12.0)
    assert torch.equal(reshard(list(vec.chunk(4)), (6,), 1, 2), vec[6:])
    assert torch.equal(reshard([vec, vec], (12,), 0, 1), vec)
    assert torch.equal(reshard(list(vec.chunk(2)), (6,), 1, 2), vec[6:])
    # vocabulary: padded rows dropped or zero-filled to this layout's padded size
    vocab = torch.randn(10, 3)
    assert torch.equal(reshard(list(vocab.chunk(2)), (8, 3), 0, 1, "vocab"), vocab[:8])
    grown = reshard([vocab], (4, 3), 2, 3, "vocab")
    assert torch.equal(grown[:2], vocab[8:]) and not grown[2:].any()
    with pytest.raises(CheckpointError, match=r"saved shard shape \[5\] at tp 2 does not "
                                              r"reshard to \[4\] at tp 1"):
        reshard([vec[:5], vec[5:10]], (4,), 0, 1, name="x")
