"""Checkpoint tools (stable_megatron/export.py, tools/inspect_checkpoint.py,
tools/export_checkpoint.py) on small checkpoints written here in DeepSpeed's layout: a model
built in this process at TP1, its tensors split into TP2 shards by megatron-core's own
partition attributes (and sigma-reparam's documented buffer sharding), one
`layer_XX-model_YY-model_states.pt` per block and rank. The merge must give back the model's
tensors; the Hugging Face GPT-2 export must give the model's logits; unreadable, incomplete
and unsafe checkpoints must be refused with one line naming the problem.
(tests/distributed/test_export.py does the same on checkpoints of real TP2 / TP2xPP2 runs.)"""

from __future__ import annotations

import builtins
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from stable_megatron.checkpoint import export, shards
from stable_megatron.checkpoint import format as fmt
from stable_megatron.config import config_from_dict, dump_config

pytestmark = pytest.mark.filterwarnings("ignore:.*tp_group is None:DeprecationWarning")

TOOLS = Path(__file__).resolve().parents[2] / "tools"
TP, STEP, CONSUMED = 2, 7, 56
# vocab 200 padded to a multiple of lcm(75, tp): 225 at TP1 but 300 at TP2, so a merge that
# pads as at TP1 would fail
BASE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "vocab_size": 200, "vocab_pad_multiple": 75, "init_std": 0.2}
CASES = {
    "tied": {},
    "untied_nobias": {"tie_embeddings": False, "add_bias_linear": False, "ffn_hidden_size": 48},
    "sigma_qk_norm": {"sigma_reparam": {"enabled": True, "init_iters": 20},
                      "norm_placement": "qk_norm"},
}


def make_config(model: dict):
    return config_from_dict({"model": {**BASE, **model}, "parallel": {"tp": TP}})


@pytest.fixture(scope="module")
def state(one_process):
    return one_process


def build(cfg, state):
    """The model of `cfg` at TP1 with the vocabulary padded as at TP2, in eval mode."""
    from stable_megatron.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(shards.reference_config(cfg, TP), state.topology, torch.device("cpu"))
    return model.eval()


def split_dims(block: torch.nn.Module) -> dict[str, int]:
    """Split dimension of every TP-sharded tensor of a block, from megatron-core's parameter
    attributes and the sigma-reparam buffer rule (column: v, row: u, along dim 0)."""
    from stable_megatron.model.sigma_reparam import (
        SigmaReparamColumnParallelLinear,
        SigmaReparamRowParallelLinear,
    )

    dims = {name: p.partition_dim for name, p in block.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SigmaReparamColumnParallelLinear):
            dims[prefix + "v"] = 0
        elif isinstance(module, SigmaReparamRowParallelLinear):
            dims[prefix + "u"] = 0
    return dims


def write_checkpoint(run_dir, cfg, model, meta: bool = True):
    """`model`'s blocks as a TP2 DeepSpeed checkpoint in `run_dir/checkpoints/step00000007`;
    returns (tag dir, {merged name: full tensor}, {merged name: split dim})."""
    tag = run_dir / "checkpoints" / f"step{STEP:08d}"
    tag.mkdir(parents=True)
    full, dims = {}, {}
    for index, block in enumerate(model.forward_funcs):
        if not hasattr(block, "state_dict"):
            continue  # the tied output layer: DeepSpeed saves block 0 only
        block_dims = split_dims(block)
        shards: list[dict] = [{} for _ in range(TP)]
        for key, value in block.state_dict().items():
            if not torch.is_tensor(value):
                for shard in shards:
                    shard[key] = value
                continue
            full[f"{index}.{key}"] = value.detach().clone()
            dims[f"{index}.{key}"] = block_dims.get(key)
            parts = value.chunk(TP, block_dims[key]) if key in block_dims else [value] * TP
            for shard, part in zip(shards, parts, strict=True):
                shard[key] = part.clone()
        for rank, shard in enumerate(shards):
            torch.save(shard, tag / fmt.layer_file(index, rank))
    torch.save({"module": None, "step": STEP, "consumed_samples": CONSUMED,
                "dp_world_size": 1, "checkpoint_parallel_dimensions": {"tp_degree": TP,
                                                                       "pp_degree": 1}},
               tag / fmt.ENGINE_FILE)
    if meta:
        files = {p.name: p.stat().st_size for p in tag.iterdir()}
        (tag / fmt.META_FILE).write_text(json.dumps({
            "format": 1, "tag": tag.name, "step": STEP, "consumed_samples": CONSUMED,
            "layout": {"tp": TP, "pp": 1, "dp": 1, "world": TP}, "config": cfg.to_dict(),
            "code_version": "test", "files": files,
        }))
    else:
        dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "checkpoints" / "latest").write_text(tag.name)
    return tag, full, dims


@pytest.fixture(scope="module")
def checkpoints(state, tmp_path_factory):
    """Per case: (config, model, tag dir, full tensors, split dims)."""
    out = {}
    for name, model_cfg in CASES.items():
        cfg = make_config(model_cfg)
        model = build(cfg, state)
        run_dir = tmp_path_factory.mktemp(name)
        out[name] = (cfg, model, *write_checkpoint(run_dir, cfg, model))
    return out


def copy_run(tag, tmp_path):
    """A copy of the run directory of `tag`; returns the copy's tag directory."""
    run_dir = tag.parent.parent
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run" / "checkpoints" / tag.name


def without_meta(tag, cfg):
    """Remove stable_megatron.json (a checkpoint of an older version): config.yaml of the run."""
    (tag / fmt.META_FILE).unlink()
    dump_config(cfg, tag.parent.parent / "config.yaml")


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize("case", list(CASES))
def test_merge_gives_the_full_tensors_back(checkpoints, case):
    cfg, model, tag, full, dims = checkpoints[case]
    ckpt = export.open_checkpoint(tag.parent)  # the checkpoint directory: its newest
    assert ckpt.tag_dir == tag
    infos, merged = export.read_tensors(ckpt)
    assert list(merged) == list(full)
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name
    assert {t.name: t.split_dim for t in infos} == dims
    assert any(d is not None for d in dims.values())  # the split attributes were found
    if case == "sigma_qk_norm":
        kinds = {t.name: t.kind for t in infos}
        assert kinds["1.layer.self_attention.linear_qkv.u"] == "buffer"
        assert dims["1.layer.self_attention.linear_qkv.v"] == 0
        assert dims["1.layer.mlp.linear_fc2.u"] == 0
        assert dims["1.layer.mlp.linear_fc2.v"] is None
    assert ckpt.notes == []


def test_split_dim_rules():
    assert shards.split_dim((8, 4), (8, 4), 2) is None
    assert shards.split_dim((4, 4), (8, 4), 2) == 0
    assert shards.split_dim((8, 2), (8, 4), 2) == 1
    assert shards.split_dim((4, 2), (8, 4), 2) == "invalid"
    assert shards.split_dim((3, 4), (8, 4), 2) == "invalid"
    assert shards.split_dim((8,), (8, 4), 2) == "invalid"


def test_summary(checkpoints):
    from stable_megatron.model import size

    cfg, _, tag, full, _ = checkpoints["untied_nobias"]
    info = export.summary(tag)
    assert (info["step"], info["consumed_samples"]) == (STEP, CONSUMED)
    assert info["layout"] == {"tp": TP, "pp": 1, "dp": 1, "world": TP}
    assert info["config_source"].endswith(fmt.META_FILE)
    assert info["total_params"] == size.total_params(cfg, TP) == sum(t.numel() for t in
                                                                    full.values())
    assert info["model"]["padded_vocab_size"] == 300
    emb = next(t for t in info["tensors"] if t["name"] == "0.word_embeddings.weight")
    assert emb == {"name": "0.word_embeddings.weight", "shape": [300, 32], "dtype": "float32",
                   "numel": 300 * 32, "kind": "param", "split_dim": 0}
    on_disk = sum(p.stat().st_size for p in tag.iterdir())
    assert info["disk"]["total_bytes"] == on_disk and info["disk"]["files"] == len(
        list(tag.iterdir()))
    text = export.format_summary(info, tensors=True)
    assert f"step         {STEP}" in text and "tp 2 x pp 1 x dp 1 (world 2)" in text
    assert "0.word_embeddings.weight" in text and "300x32" in text


def test_summary_without_meta_reads_engine_file_and_run_config(checkpoints, tmp_path):
    cfg, _, tag, _, _ = checkpoints["tied"]
    tag = copy_run(tag, tmp_path)
    without_meta(tag, cfg)
    with pytest.raises(fmt.CheckpointError, match="read by naming its directory"):
        export.summary(tag.parent.parent)  # no complete checkpoint in the run directory
    info = export.summary(tag)
    assert (info["step"], info["consumed_samples"]) == (STEP, CONSUMED)
    assert info["layout"]["tp"] == TP
    assert info["config_source"] == str(tag.parent.parent / "config.yaml")
    # no config.yaml either: the error says what to pass; an explicit --config works
    moved = tmp_path / "elsewhere.yaml"
    (tag.parent.parent / "config.yaml").rename(moved)
    with pytest.raises(fmt.CheckpointError, match="pass the run's config with --config"):
        export.open_checkpoint(tag)
    assert export.open_checkpoint(tag, config=moved).config.model.vocab_size == 200


# ------------------------------------------------------------------ exports


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).transpose(0, 1)  # [s, b, V] -> [b, s, V]


@pytest.mark.parametrize("case", ["tied", "untied_nobias"])
def test_hf_gpt2_gives_the_models_logits(checkpoints, case, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, model, tag, _, _ = checkpoints[case]
    out = export.export_hf_gpt2(export.open_checkpoint(tag), tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == cfg.model.tie_embeddings
    tokens = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(1))
    want = our_logits(model, tokens)
    with torch.no_grad():
        got = hf(tokens).logits
    assert got.shape == want.shape == (3, 16, 300)
    assert want.std() > 0.1  # init_std 0.2: far from constant logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    trimmed = export.export_hf_gpt2(export.open_checkpoint(tag), tmp_path / "trim",
                                    trim_vocab=True)
    with torch.no_grad():
        got = transformers.GPT2LMHeadModel.from_pretrained(trimmed).eval()(tokens).logits
    torch.testing.assert_close(got, want[..., :200], atol=1e-5, rtol=1e-5)


def test_qkv_reorder():
    heads, d_head, d = 3, 2, 5
    # row of linear_qkv: head h, part p (q, k, v), index i -> value 100 h + 10 p + i
    rows = torch.tensor([100 * h + 10 * p + i for h in range(heads) for p in range(3)
                         for i in range(d_head)], dtype=torch.float32)
    weight = rows[:, None].expand(-1, d).clone()
    blocks = export._qkv_rows_to_blocks(weight, heads)
    want = torch.tensor([100 * h + 10 * p + i for p in range(3) for h in range(heads)
                         for i in range(d_head)], dtype=torch.float32)
    assert torch.equal(blocks[:, 0], want)
    assert torch.equal(export._qkv_rows_to_blocks(rows, heads), want)


def test_safetensors_export(checkpoints, tmp_path):
    cfg, _, tag, full, _ = checkpoints["sigma_qk_norm"]
    out = export.export_safetensors(export.open_checkpoint(tag), tmp_path / "m.safetensors")
    tensors, meta = export.read_safetensors(out)
    assert tensors.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(tensors[name], tensor), name
    assert meta["config"] == cfg.to_dict()
    assert meta["checkpoint"]["step"] == STEP
    assert meta["checkpoint"]["layout"]["tp"] == TP


def test_non_baseline_models_are_refused_naming_the_fields(checkpoints, tmp_path):
    _, _, tag, _, _ = checkpoints["sigma_qk_norm"]
    with pytest.raises(export.NotExpressibleError) as err:
        export.export_hf_gpt2(export.open_checkpoint(tag), tmp_path / "hf")
    assert "model.norm_placement=qk_norm" in str(err.value)
    assert "model.sigma_reparam.enabled=true" in str(err.value)
    assert not (tmp_path / "hf").exists()
    cfg = make_config({"position_embedding": "rope", "attention": "mlra", "softmax_cap": 30.0})
    blockers = " ".join(export.hf_gpt2_blockers(cfg))
    for field in ("model.position_embedding=rope", "model.attention=mlra",
                  "model.softmax_cap=30.0"):
        assert field in blockers
    assert export.hf_gpt2_blockers(make_config({"tie_embeddings": False})) == []


# ------------------------------------------------------------------ refusals and errors


class _Payload:
    """Unpickling this calls `open(marker, "w")`: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_a_pickle_that_runs_code_is_refused(checkpoints, tmp_path):
    _, _, tag, _, _ = checkpoints["tied"]
    tag = copy_run(tag, tmp_path)
    # the payload is live: unpickled as an arbitrary object it creates its marker
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof))).close()
    assert proof.exists()
    marker = tmp_path / "marker"
    victim = tag / fmt.layer_file(1, 1)
    for writer in ("torch.save", "pickle"):
        if writer == "torch.save":
            torch.save({"layer.input_layernorm.weight": _Payload(marker)}, victim)
        else:
            victim.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
        meta = json.loads((tag / fmt.META_FILE).read_text())  # a consistent manifest
        meta["files"][victim.name] = victim.stat().st_size
        (tag / fmt.META_FILE).write_text(json.dumps(meta))
        with pytest.raises(fmt.CheckpointError) as err:
            export.merged_state_dict(export.open_checkpoint(tag))
        message = str(err.value)
        assert str(victim) in message and "open" in message and "weights_only" in message
        assert "\n" not in message
        assert not marker.exists(), writer


def test_missing_shard_is_named(checkpoints, tmp_path):
    cfg, _, tag, _, _ = checkpoints["tied"]
    tag = copy_run(tag, tmp_path)
    (tag / fmt.layer_file(2, 1)).unlink()
    with pytest.raises(fmt.CheckpointError, match=r"missing shard layer_02-model_01"):
        export.open_checkpoint(tag)
    without_meta(tag, cfg)  # no manifest: found from the files of the other rank
    with pytest.raises(fmt.CheckpointError,
                       match=r"missing shard layer_02-model_01-model_states.pt \(block 2, "
                             r"tensor-parallel rank 1\)"):
        export.open_checkpoint(tag)
    for rank in range(TP):  # the last block gone on every rank: found from the model
        (tag / fmt.layer_file(3, rank)).unlink(missing_ok=True)
    (tag / fmt.layer_file(2, 1)).write_bytes(
        (tag / fmt.layer_file(2, 0)).read_bytes())
    ckpt = export.open_checkpoint(tag)
    with pytest.raises(fmt.CheckpointError, match=r"missing shard layer_03-model_00"):
        export.read_tensors(ckpt)


def test_truncated_file_is_named(checkpoints, tmp_path):
    cfg, _, tag, _, _ = checkpoints["tied"]
    tag = copy_run(tag, tmp_path)
    victim = tag / fmt.layer_file(1, 0)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(fmt.CheckpointError,
                       match=rf"{tag}: shard {victim.name} is truncated or altered"):
        export.open_checkpoint(tag)
    without_meta(tag, cfg)  # no manifest: torch's reader finds it
    ckpt = export.open_checkpoint(tag)
    with pytest.raises(fmt.CheckpointError, match=rf"{victim}: truncated or corrupt"):
        export.read_tensors(ckpt)


def test_wrong_shapes_are_named(checkpoints, tmp_path):
    cfg, _, tag, _, _ = checkpoints["tied"]
    tag = copy_run(tag, tmp_path)
    without_meta(tag, cfg)
    victim = tag / fmt.layer_file(1, 0)
    state = torch.load(victim, weights_only=True)
    state["layer.mlp.linear_fc1.weight"] = state["layer.mlp.linear_fc1.weight"][:-1]
    torch.save(state, victim)
    with pytest.raises(fmt.CheckpointError,
                       match=r"linear_fc1.weight has shape \[63, 32\], neither the full shape "
                             r"\[128, 32\] nor a 1/2 split"):
        export.read_tensors(export.open_checkpoint(tag))
    del state["layer.mlp.linear_fc1.weight"]
    torch.save(state, victim)
    with pytest.raises(fmt.CheckpointError, match=r"no tensor layer.mlp.linear_fc1.weight"):
        export.read_tensors(export.open_checkpoint(tag))


def test_wrong_directory_is_named(checkpoints, tmp_path):
    with pytest.raises(fmt.CheckpointError, match="not a checkpoint: expected stable_megatron"):
        export.open_checkpoint(tmp_path)
    with pytest.raises(fmt.CheckpointError, match="no such file or directory"):
        export.open_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(fmt.CheckpointError, match="is a file"):
        export.open_checkpoint(tmp_path / "file")
    (tmp_path / "latest").write_text("step00000009")  # `latest` alone is not trusted
    with pytest.raises(fmt.CheckpointError, match="not a checkpoint"):
        export.open_checkpoint(tmp_path)
    (tmp_path / "step00000009").mkdir()
    (tmp_path / "step00000009" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(fmt.CheckpointError, match="not a checkpoint"):
        export.open_checkpoint(tmp_path)
    with pytest.raises(fmt.CheckpointError, match="has DeepSpeed files but no stable_megatron"):
        export.open_checkpoint(tmp_path / "step00000009")
    (tmp_path / "step00000009" / fmt.META_FILE).write_text(json.dumps(
        {"step": 9, "consumed_samples": 0, "layout": {}, "config": {}, "files": {}}))
    with pytest.raises(fmt.CheckpointError, match="no layer_XX-model_YY-model_states.pt files"):
        export.open_checkpoint(tmp_path)


# ------------------------------------------------------------------ command lines


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_cli(checkpoints, capsys):
    inspect_checkpoint = load_tool("inspect_checkpoint")
    _, _, tag, _, _ = checkpoints["tied"]
    assert inspect_checkpoint.main([str(tag.parent), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert f"step         {STEP}   consumed samples {CONSUMED}" in out
    assert "layout       tp 2 x pp 1 x dp 1 (world 2)" in out
    assert "1.layer.self_attention.linear_qkv.weight" in out
    assert inspect_checkpoint.main([str(tag), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == STEP and info["layout"]["tp"] == TP
    assert inspect_checkpoint.main([str(tag.parent.parent.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_export_cli(checkpoints, capsys, tmp_path):
    export_checkpoint = load_tool("export_checkpoint")
    _, _, tag, full, _ = checkpoints["tied"]
    out = tmp_path / "w.safetensors"
    assert export_checkpoint.main([str(tag), "--format", "safetensors", "--out", str(out)]) == 0
    assert export.read_safetensors(out)[0].keys() == full.keys()
    capsys.readouterr()
    _, _, sigma, _, _ = checkpoints["sigma_qk_norm"]
    assert export_checkpoint.main([str(sigma), "--format", "hf-gpt2", "--out",
                                   str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.sigma_reparam.enabled=true" in err
    assert export_checkpoint.main([str(tag), "--format", "hf-llama", "--out",
                                   str(tmp_path / "llama")]) == 2
    err = capsys.readouterr().err
    assert "model.normalization=layernorm" in err and "model.activation=gelu" in err
    assert err.count("\n") == 1
