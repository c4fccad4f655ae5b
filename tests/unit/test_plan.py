"""`stable-megatron plan`: numbers against hand computation for a small config, rank groups
against DeepSpeed's topology, layouts from recipes, launch commands against golden files
(regenerate with UPDATE_GOLDEN=1), and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stable_megatron.config import ConfigError, load_config, validate
from stable_megatron.plan import (
    LaunchSpec,
    groups,
    launch_text,
    layout_overrides,
    main,
    make_plan,
    recipe_layouts,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
TINY = ROOT / "recipes" / "tiny.yaml"
# d = 64, f = 256, 4 heads, 4 layers, seq 32, vocabulary 1000 (padded to 1024 at tp 2),
# untied, learned positions, bf16; 2 nodes x 4 GPUs = tp 2 x pp 2 x dp 2, accumulation 4.
SMALL = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1000", "model.tie_embeddings=false",
    "train.precision=bf16", "parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2",
    "train.global_batch_size=16", "train.steps=100",
]


def small_plan():
    return make_plan(load_config(TINY, SMALL), nodes=2, gpus_per_node=4, gpu="a100", mfu=0.5)


def test_counts_memory_and_speed_by_hand():
    plan = small_plan()
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp, plan.accumulation) == (2, 2, 2, 4)
    # one layer, whole: 12 d^2 + 13 d = 49,984; on one of 2 TP ranks: LNs 128 + 128, QKV
    # 6144 + 96, Proj 2048 + 64, FC1 8192 + 128, FC2 8192 + 64 = 25,184
    # total: word 1024 x 64 + positions 32 x 64 + 4 layers + final norm 128 + head 1024 x 64
    assert plan.total_params == 65_536 + 2_048 + 4 * 49_984 + 128 + 65_536 == 333_184
    first, last = plan.stages
    assert first.layers == (1, 2) and last.layers == (3, 4)
    assert first.per_rank == 2 * 25_184 + 32_768 + 2_048 == 85_184
    assert last.per_rank == 2 * 25_184 + 128 + 32_768 == 83_264
    m0, m1 = plan.memory
    assert m0.weights == 2 * 85_184
    assert m0.grads == 6 * 85_184
    assert m0.optimizer == 12 * 85_184 / 2
    per_layer = 32 * 2 * 64 * (10 + 24 / 2)  # s b h (10 + 24 / t) = 90,112 bytes
    logits = 32 * 2 * 1024 / 2 * 10
    assert m0.activations == 2 * 2 * per_layer  # 2 layers x 2 micro-batches in flight
    assert m1.activations == 2 * 1 * per_layer + logits
    assert m0.activations_recompute == 2 * 2 * (2 * 32 * 2 * 64) + per_layer
    assert m1.activations_recompute == 2 * 1 * (2 * 32 * 2 * 64) + per_layer + logits
    # FLOPs: 6 x (layers + final norm + head at 1024) + 12 L s d
    assert plan.flops_per_token == 6 * (4 * 49_984 + 128 + 65_536) + 12 * 4 * 32 * 64
    assert plan.flops_per_token == 1_691_904
    assert plan.tokens_per_sec == pytest.approx(0.5 * 312e12 * 8 / 1_691_904)


def test_fp32_and_tied_embeddings():
    cfg = load_config(TINY, [*SMALL, "train.precision=fp32", "model.tie_embeddings=true"])
    plan = make_plan(cfg, nodes=2, gpus_per_node=4)
    first, last = plan.stages
    # the last stage holds a copy of the tied word embedding (no positions), no output layer
    assert last.per_rank == 2 * 25_184 + 128 + 32_768
    assert plan.total_params == 65_536 + 2_048 + 4 * 49_984 + 128
    assert plan.memory[0].weights == 4 * first.per_rank
    assert plan.memory[0].grads == 4 * first.per_rank
    assert plan.memory[1].activations == 2 * (2 * 32 * 2 * 64 * 22) + 32 * 2 * 512 * 8


def test_memory_by_zero_stage_by_hand():
    """Each stage's weights, gradients and optimizer state per GPU at pp = 1 (tp 2 x dp 4),
    as DeepSpeed holds them (measured on CPU: docs/performance.md#zero-stages)."""
    for precision in ("fp32", "bf16"):
        cfg = load_config(TINY, [*SMALL, "parallel.pp=1", f"train.precision={precision}"])
        plan = make_plan(cfg, nodes=2, gpus_per_node=4)
        p, dp, w = plan.stages[0].per_rank, plan.layout.dp, 4 if precision == "fp32" else 2
        assert dp == 4
        by = plan.by_zero_stage
        assert set(by) == ({0, 1, 2, 3} if precision == "fp32" else {1, 2, 3})
        if precision == "fp32":
            assert (by[0].weights, by[0].grads, by[0].optimizer) == (4 * p, 4 * p, 8 * p)
        grads_whole = 4 * p if precision == "fp32" else 6 * p
        assert (by[1].weights, by[1].grads, by[1].optimizer) == (w * p, grads_whole, 12 * p / dp)
        assert (by[2].weights, by[2].grads, by[2].optimizer) == (w * p, 4 * p / dp, 12 * p / dp)
        master = 0 if precision == "fp32" else 4  # fp32: the weights' partition is the master
        assert (by[3].weights, by[3].grads, by[3].optimizer) == (
            w * p / dp, 4 * p / dp, (8 + master) * p / dp)


def test_groups_match_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    g = groups(8, 2, 2)
    assert g == {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }
    for world, tp, pp in [(8, 2, 2), (16, 2, 4), (64, 1, 1), (32, 4, 2)]:
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
        g = groups(world, tp, pp)
        for ours, axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe")):
            assert sorted(map(sorted, g[ours])) == sorted(map(sorted,
                                                              topo.get_axis_comm_lists(axis)))


def test_recipe_layouts_apply_and_overrides_win():
    recipe = ROOT / "recipes" / "rybakov_830m" / "qk_norm.yaml"
    assert layout_overrides(recipe, 16) == [
        "parallel.tp=1", "parallel.pp=1", "train.micro_batch_size=2"]
    assert layout_overrides(recipe, 12) == []
    cfg = load_config(recipe, [*layout_overrides(recipe, 64), "train.micro_batch_size=4"])
    assert cfg.train.micro_batch_size == 4


@pytest.mark.parametrize("text, match", [
    ("layouts: {8: {tp: 2, dp: 4}}", "unknown key layouts.8.dp"),
    ("layouts: {eight: {tp: 2}}", "layouts key 'eight'"),
    ("layouts: {8: {tp: 0}}", r"layouts.8.tp=0: must be an integer > 0"),
    ("layouts: [8]", "layouts must map"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {TINY}\n{text}\n")
    with pytest.raises(ConfigError, match=match) as err:
        recipe_layouts(recipe)
    assert "\n" not in str(err.value)


def _spec(nodes: int) -> LaunchSpec:
    return LaunchSpec("recipes/rybakov_830m/qk_norm_cap.yaml",
                      [*layout_overrides(ROOT / "recipes/rybakov_830m/qk_norm_cap.yaml", 8 * nodes),
                       "train.run_dir=/shared/runs/qk_norm_cap"],
                      nodes, 8, [f"gpu-{i:03d}" for i in range(nodes)], 29500,
                      "/shared/hostfile")


@pytest.mark.parametrize("name, nodes, launcher", [
    ("launch_hostfile_2nodes.txt", 2, "hostfile"),
    ("launch_slurm_4nodes.txt", 4, "slurm"),
    ("launch_single_node.txt", 1, "hostfile"),
])
def test_launch_commands_golden(name, nodes, launcher):
    text = launch_text(_spec(nodes), launcher)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_cli_prints_plan_and_commands(capsys):
    assert main([str(TINY), *SMALL, "--nodes", "2", "--gpus-per-node", "4", "--gpu", "a100",
                 "--mfu", "0.5", "--hosts", "a,b"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = 2 node(s) x 4 GPUs = tp 2 x pp 2 x dp 2" in out
    assert "TP groups (4 of 2): [0,1] [2,3] [4,5] [6,7]" in out
    assert "parameters: total 333,184" in out
    assert "stage 1: layers 3-4, 83,264 per GPU" in out
    assert "--no_ssh --node_rank 1 --master_addr a" in out


def test_cli_errors_are_one_line(capsys):
    assert main([str(TINY), "parallel.tp=3", "--nodes", "1", "--gpus-per-node", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.num_attention_heads=4 is not divisible by parallel.tp=3")
    assert err.count("\n") == 1
    assert main([str(TINY), "--nodes", "2", "--gpus-per-node", "3"]) == 2  # 32 % (16 * 6)
    assert "global_batch_size" in capsys.readouterr().err
    assert main([str(TINY), "--nodes", "2", "--hosts", "a"]) == 2
    assert "--hosts names 1 nodes" in capsys.readouterr().err


def test_cli_print_overrides(capsys):
    recipe = str(ROOT / "recipes" / "gpt2_depth" / "l48_mlra.yaml")
    assert main([recipe, "--nodes", "4", "--print-overrides"]) == 0
    assert capsys.readouterr().out == "parallel.tp=1 parallel.pp=1 train.micro_batch_size=8\n"


def test_throughput_accounting():
    from stable_megatron.model.size import peak_tflops, throughput

    cfg = load_config(TINY, SMALL)
    validate(cfg, 8)  # resolves model.vocab_size (1000, the tokenizer's)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("cpu") is None
    # 8 GPUs at 1e6 tokens/s each: 1,691,904 FLOPs per token -> 1.691904 TFLOP/s per device
    got = throughput(cfg, 8e6, 8, "NVIDIA A100-SXM4-80GB")
    assert got["tflops_per_device"] == pytest.approx(1.691904)
    assert got["mfu"] == pytest.approx(1.691904 / 312)
    assert "mfu" not in throughput(cfg, 8e6, 8, "cpu")


@pytest.mark.parametrize("layers, pp", [(4, 2), (24, 4), (48, 8), (12, 3)])
def test_stage_split_matches_deepspeed_partition(layers, pp):
    """plan's stages = DeepSpeed's `type:TransformerLayerPipe` partition of [embedding,
    layers, final norm, head]: the embedding on the first stage, norm and head on the last."""
    from deepspeed.runtime.utils import partition_balanced

    from stable_megatron.model.size import stage_params

    bounds = [int(b) for b in partition_balanced([0] + [1] * layers + [0, 0], pp)]
    cfg = load_config(TINY, [f"model.num_layers={layers}", f"parallel.pp={pp}"])
    cfg.model.vocab_size = 1000
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    for stage, (lo, hi) in zip(stage_params(cfg, 1, pp), spans, strict=True):
        items = list(range(lo, hi))  # 0 = embedding, 1..L = layers, L+1 = norm, L+2 = head
        got_layers = [i for i in items if 1 <= i <= layers]
        assert (got_layers[0], got_layers[-1]) == stage.layers
        assert (0 in items) == (stage.stage == 0)
        assert (layers + 2 in items) == (stage.stage == pp - 1)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_memory_follows_train_recompute(mode, capsys):
    """The configured mode's activations (model/recompute.py), with the scores materialised
    (attention_backend=math): selective drops them but for the layer being recomputed, full
    keeps each layer's input and one layer's activations."""
    overrides = [*SMALL, "model.attention_backend=math", f"train.recompute={mode}"]
    m0, m1 = make_plan(load_config(TINY, overrides), nodes=2, gpus_per_node=4).memory
    rest = 32 * 2 * 64 * (10 + 24 / 2)  # s b h (10 + 24 / t) = 90,112 bytes
    scores = 5 * 4 * 32 * 32 * 2 / 2  # 5 a s^2 b / t = 20,480 bytes
    layer_input = 2 * 32 * 2 * 64
    logits = 32 * 2 * 1024 / 2 * 10
    expected = {  # stage 0: 2 layers x 2 micro-batches in flight; stage 1: 2 x 1 and logits
        "none": (4 * (rest + scores), 2 * (rest + scores) + logits),
        "selective": (4 * rest + scores, 2 * rest + scores + logits),
        "full": (4 * layer_input + rest + scores, 2 * layer_input + rest + scores + logits),
    }
    assert (m0.activations_configured, m1.activations_configured) == expected[mode]
    assert (m0.activations, m1.activations) == expected["none"]
    assert (m0.activations_recompute, m1.activations_recompute) == expected["full"]
    assert m0.total == m0.weights + m0.grads + m0.optimizer + expected[mode][0]
    assert m0.total_recompute == m0.weights + m0.grads + m0.optimizer + expected["full"][0]
    assert main([str(TINY), *overrides, "--nodes", "2", "--gpus-per-node", "4",
                 "--launcher", "none"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "stage 0: weights" in x)
    assert f"(recompute {mode})" in line
    assert ("with full recompute" in line) == (mode != "full")


def test_selective_recompute_saves_nothing_beside_a_fused_kernel():
    cfg = load_config(TINY, [*SMALL, "train.recompute=selective"])  # auto: fused on GPU
    for mem in make_plan(cfg, nodes=2, gpus_per_node=4).memory:
        assert mem.activations_selective == mem.activations == mem.activations_configured
