"""Checkpoint tools on checkpoints of real training runs (the trainer on 4 gloo processes,
2 steps each): TP2xPP2 (untied), TP2xDP2 (tied), TP2xPP2 with sigma-reparam + QK norm, and
TP2xPP2 Llama-style (RMSNorm, SwiGLU: FC1 split with stride 2).

- the merged weights, loaded into the model built in this process at TP1, reproduce each run's
  logged validation loss (evaluated by the TP2 engine on the same weights after the last step):
  the merge is right, sigma-reparam's u/v buffers included;
- the Hugging Face GPT-2 export of the baseline runs, loaded with `GPT2LMHeadModel`, gives the
  logits of that TP1 model;
- the safetensors export equals the shard files, tensor by tensor;
- the inspect CLI prints the step and layout; unreadable or unsafe files are refused.
(tests/unit/test_export.py covers the same on checkpoints written in-process, faster.)"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from stable_megatron.checkpoint import export, shards
from stable_megatron.checkpoint import format as fmt
from tests.distributed.launch import torchrun
from tests.scripts import run_script

pytestmark = [pytest.mark.distributed,
              pytest.mark.filterwarnings("ignore:.*tp_group is None:DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("export_worker.py")
CASES = {
    "tp2pp2": ["parallel.pp=2", "model.tie_embeddings=false"],
    "tp2dp2": [],
    "sigma": ["parallel.pp=2", "model.sigma_reparam.enabled=true", "model.norm_placement=qk_norm"],
    # SwiGLU's FC1 is split with stride 2: the merge must interleave the ranks' halves
    "llama": ["parallel.pp=2", "model.normalization=rmsnorm", "model.activation=swiglu",
              "model.position_embedding=rope", "model.tie_embeddings=false",
              "model.add_bias_linear=false"],
}
BASELINES = ["tp2pp2", "tp2dp2"]
LAYOUTS = {"tp2pp2": (2, 2, 1), "tp2dp2": (2, 1, 2), "sigma": (2, 2, 1), "llama": (2, 2, 1)}
STEPS = 2
COMMON = [
    "parallel.tp=2", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1024",
    # padded to a multiple of lcm(99, tp): 1188 at TP2 but 1089 at TP1: the merge must pad as
    # the run did
    "model.vocab_pad_multiple=99",
    f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.warmup_steps=1", "train.eval_interval=2", "train.eval_iters=2", "metrics.interval=0",
    "logging.tensorboard=false", "logging.progress=false",
]


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return run_script(ROOT / "tools" / f"{name}.py", *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> Path:
    out = tmp_path_factory.mktemp("export-runs")
    torchrun(WORKER, 4, [str(out), json.dumps(CASES), *COMMON, f"data.cache_dir={data_cache}"],
             timeout=1200)
    return out


@pytest.fixture(scope="module")
def state(one_process):
    return one_process


def tp1_model(ckpt, state, merged):
    from stable_megatron.model.gpt import build_model

    cfg = shards.reference_config(ckpt.config, ckpt.tp)
    model = build_model(cfg, state.topology, torch.device("cpu"))
    export.load_into_model(model, merged)
    return model.eval()


def validation_rows(cfg) -> torch.Tensor:
    """The samples of the run's validation (eval_iters global batches from sample 0)."""
    from stable_megatron.data.dataset import TokenWindowDataset
    from stable_megatron.train import resolve_data

    dataset = TokenWindowDataset(resolve_data(cfg).val_prefix, cfg.model.seq_length,
                                 seed=cfg.train.seed)
    count = cfg.train.eval_iters * cfg.train.global_batch_size
    return torch.from_numpy(np.stack([dataset[i] for i in range(count)]))


@pytest.mark.parametrize("case", list(CASES))
def test_merged_weights_reproduce_the_runs_validation_loss(runs, state, case):
    from stable_megatron.model.gpt import lm_loss

    ckpt = export.open_checkpoint(runs / case / "checkpoints")
    assert (ckpt.tp, ckpt.layout["pp"], ckpt.layout["dp"]) == LAYOUTS[case]
    assert ckpt.step == STEPS and ckpt.config_source.endswith(fmt.META_FILE)
    model = tp1_model(ckpt, state, export.merged_state_dict(ckpt))
    assert ckpt.notes == []  # TP-replicated tensors are equal on both ranks
    rows = validation_rows(ckpt.config)
    with torch.no_grad():
        loss = lm_loss(model(rows[:, :-1]), rows[:, 1:]).item()
    records = [json.loads(line) for line in (runs / case / "metrics.jsonl").read_text()
               .splitlines()]
    logged = next(r["val_loss"] for r in records if r["step"] == STEPS and "val_loss" in r)
    assert loss == pytest.approx(logged, abs=1e-5)


@pytest.mark.parametrize("case", BASELINES)
def test_hf_gpt2_export_gives_the_tp1_logits(runs, state, case, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = export.open_checkpoint(runs / case)
    out = tmp_path / "hf"
    proc = run_tool("export_checkpoint", str(runs / case), "--format", "hf-gpt2",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {STEPS}" in proc.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model = tp1_model(ckpt, state, export.merged_state_dict(ckpt))
    tokens = validation_rows(ckpt.config)[:, :-1]
    with torch.no_grad():
        want = model(tokens).transpose(0, 1)
        got = hf(tokens).logits
    assert got.shape == want.shape == (*tokens.shape, 1188)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_safetensors_export_equals_the_shards(runs, tmp_path):
    from stable_megatron.model import size

    ckpt = export.open_checkpoint(runs / "sigma" / "checkpoints")
    out = export.export_safetensors(ckpt, tmp_path / "sigma.safetensors")
    tensors, meta = export.read_safetensors(out)
    info = export.summary(ckpt)
    assert info["total_params"] == size.total_params(ckpt.config, ckpt.tp)
    assert info["total_buffer_values"] > 0  # sigma-reparam's u and v
    assert sorted(t["name"] for t in info["tensors"]) == sorted(tensors)
    shards = {}
    for t in info["tensors"]:
        block, key = t["name"].split(".", 1)
        for rank in range(ckpt.tp):
            path = ckpt.tag_dir / fmt.layer_file(int(block), rank)
            if path not in shards:
                shards[path] = torch.load(path, map_location="cpu", weights_only=True)
            shard = shards[path][key]
            full = tensors[t["name"]]
            assert list(full.shape) == t["shape"]
            want = full if t["split_dim"] is None else full.chunk(ckpt.tp, t["split_dim"])[rank]
            assert torch.equal(want, shard), (t["name"], rank)
    assert meta["config"] == ckpt.config.to_dict()
    assert meta["checkpoint"]["step"] == STEPS
    assert meta["checkpoint"]["layout"] == ckpt.layout
    refused = run_tool("export_checkpoint", str(runs / "sigma"), "--format", "hf-gpt2",
                       "--out", str(tmp_path / "hf"))
    assert refused.returncode == 2
    assert "model.sigma_reparam.enabled=true" in refused.stderr
    assert "model.norm_placement=qk_norm" in refused.stderr


def test_inspect_cli_prints_step_and_layout(runs):
    proc = run_tool("inspect_checkpoint", str(runs / "tp2pp2" / "checkpoints"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step         {STEPS}   consumed samples {STEPS * 4}" in proc.stdout
    assert "layout       tp 2 x pp 2 x dp 1 (world 4)" in proc.stdout
    assert "untied embeddings" in proc.stdout


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_broken_and_unsafe_checkpoints_are_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "tp2dp2", run)
    tag = fmt.resolve(run / "checkpoints")
    meta_path = tag / fmt.META_FILE
    original = meta_path.read_text()

    victim = tag / fmt.layer_file(1, 1)
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(fmt.CheckpointError, match="missing shard layer_01-model_01"):
        export.open_checkpoint(tag)

    victim.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(fmt.CheckpointError,
                       match=f"{tag}: shard {victim.name} is truncated or altered"):
        export.open_checkpoint(tag)
    meta_path.unlink()  # no manifest (and the config from the run's config.yaml)
    ckpt = export.open_checkpoint(tag)
    assert ckpt.config_source == str(run / "config.yaml") and ckpt.step == STEPS
    with pytest.raises(fmt.CheckpointError, match=f"{victim}: truncated or corrupt"):
        export.read_tensors(ckpt)

    marker = tmp_path / "marker"
    torch.save({"layer.input_layernorm.weight": _Payload(marker)}, victim)
    meta = json.loads(original)  # with a manifest that matches the crafted file
    meta["files"][victim.name] = victim.stat().st_size
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(fmt.CheckpointError, match=f"{victim}: refused"):
        export.merged_state_dict(export.open_checkpoint(tag))
    proc = run_tool("inspect_checkpoint", str(tag))
    assert proc.returncode == 2 and "refused" in proc.stderr and "weights_only" in proc.stderr
    assert not marker.exists()

    with pytest.raises(fmt.CheckpointError, match="not a checkpoint: expected stable_megatron"):
        export.open_checkpoint(tmp_path)
