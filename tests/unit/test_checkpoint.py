"""Checkpoint files in one process: clear errors for bad checkpoints (missing or truncated
shard, incompatible config, wrong directory, a pickle that runs code), keep-K, finetune."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stable_megatron import checkpoint as ckpt
from stable_megatron import parallel
from stable_megatron.config import load_config, validate
from stable_megatron.train import Trainer, main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1024", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=1", "train.eval_interval=0",
    "metrics.interval=0", "logging.tensorboard=false", "logging.progress=false",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_cache) -> Path:
    """A run of 2 steps with a checkpoint after each; returns its checkpoint directory."""
    run = tmp_path_factory.mktemp("saved") / "run"
    assert main([TINY, *SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={run}",
                 "train.steps=2", "checkpoint.interval=1", "checkpoint.keep=0"]) == 0
    return run / "checkpoints"


def load_from(path, tmp_path, data_cache, capsys, *extra) -> tuple[int, str]:
    code = main([TINY, *SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={tmp_path / 'r'}",
                 "train.steps=3", f"checkpoint.load={path}", *extra])
    return code, capsys.readouterr().err.strip()


def copy_of(saved: Path, tmp_path: Path) -> Path:
    tag = tmp_path / "copy" / "step00000002"
    shutil.copytree(saved / "step00000002", tag)
    return tag


def test_checkpoint_has_everything_for_a_resume(saved):
    tag = saved / "step00000002"
    meta = ckpt.read_meta(tag)
    assert meta["step"] == 2 and meta["consumed_samples"] == 8
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world": 1}
    assert meta["config"]["model"]["hidden_size"] == 64 and meta["code_version"]
    assert set(meta["files"]) == {str(p.relative_to(tag)) for p in tag.rglob("*")
                                  if p.is_file() and p.name != ckpt.META_FILE}
    rng = ckpt.safe_load(tag / "rng" / "rank00000.pt")
    assert {"torch", "numpy", "python", "tracker"} <= rng.keys()
    client = ckpt.safe_load(tag / "mp_rank_00_model_states.pt")
    for key in ("step", "consumed_samples", "rollbacks", "lr_scale", "spike_detector"):
        assert key in client, key
    assert (saved / "latest").read_text().strip() == "step00000002"
    assert ckpt.newest_complete(saved) == tag
    assert not any(p.name.startswith(".tmp") for p in saved.iterdir())


def test_wrong_directory(tmp_path, data_cache, capsys):
    (tmp_path / "empty").mkdir()
    code, err = load_from(tmp_path / "empty", tmp_path, data_cache, capsys)
    assert code == 2 and "not a checkpoint" in err and err.count("\n") == 0
    code, err = load_from(tmp_path / "nowhere", tmp_path, data_cache, capsys)
    assert code == 2 and "no such file or directory" in err


def test_missing_shard(saved, tmp_path, data_cache, capsys):
    tag = copy_of(saved, tmp_path)
    (tag / "layer_01-model_00-model_states.pt").unlink()
    code, err = load_from(tag, tmp_path, data_cache, capsys)
    assert code == 2 and "missing shard layer_01-model_00-model_states.pt" in err


def test_truncated_shard(saved, tmp_path, data_cache, capsys):
    tag = copy_of(saved, tmp_path)
    shard = next(tag.glob("*optim_states.pt"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, err = load_from(tag, tmp_path, data_cache, capsys)
    assert code == 2 and f"shard {shard.name} is truncated" in err


def test_incompatible_model_config_names_the_fields(saved, tmp_path, data_cache, capsys):
    code, err = load_from(saved, tmp_path, data_cache, capsys, "model.hidden_size=128",
                          "model.norm_placement=qk_norm")
    assert code == 2 and "incompatible model config" in err
    assert "model.hidden_size (checkpoint 64, this run 128)" in err
    assert "model.norm_placement (checkpoint 'pre_ln', this run 'qk_norm')" in err


def test_corrupt_manifest(saved, tmp_path, data_cache, capsys):
    tag = copy_of(saved, tmp_path)
    (tag / ckpt.META_FILE).write_text("{not json")
    code, err = load_from(tag, tmp_path, data_cache, capsys)
    assert code == 2 and "corrupt" in err


class _Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_that_runs_code_is_refused(saved, tmp_path, data_cache, capsys):
    tag = copy_of(saved, tmp_path)
    marker = tmp_path / "marker"
    target = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": _Payload(marker)}, target)
    meta = json.loads((tag / ckpt.META_FILE).read_text())
    meta["files"]["mp_rank_00_model_states.pt"] = target.stat().st_size  # passes the size check
    meta["checksums"]["mp_rank_00_model_states.pt"] = ckpt.file_checksum(target)  # and the CRC
    (tag / ckpt.META_FILE).write_text(json.dumps(meta))
    code, err = load_from(tag, tmp_path, data_cache, capsys)
    assert code == 2 and "refused" in err and "mp_rank_00_model_states.pt" in err
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.safe_load(target)
    assert not marker.exists()
    # The same file does run code when unpickled without the guard (the test can fail).
    torch.load(target, weights_only=False)
    assert marker.read_text() == "pwned"


def test_keep_prunes_oldest_and_skips_incomplete(tmp_path):
    d = tmp_path / "ckpts"
    for step in (1, 2, 3, 4):
        tag = d / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        (tag / ckpt.META_FILE).write_text(json.dumps(
            {"step": step, "consumed_samples": step, "layout": {}, "config": {}, "files": {},
             "saved_at": step}))
    (d / ".tmp-step00000005" / "step00000005").mkdir(parents=True)  # an interrupted save
    (d / "step00000009").mkdir()  # no manifest: incomplete, never chosen
    assert ckpt.newest_complete(d) == d / "step00000004"
    assert ckpt.prune(d, keep=2) == ["step00000001", "step00000002"]
    assert ckpt.newest_complete(d) == d / "step00000004"
    assert sorted(p.name for p in d.iterdir()) == [
        ".tmp-step00000005", "step00000003", "step00000004", "step00000009"]
    assert ckpt.prune(d, keep=0) == []


def test_finetune_loads_weights_only_then_resumes_its_own(saved, tmp_path, data_cache):
    overrides = [*SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={tmp_path / 'ft'}",
                 "train.steps=1", f"checkpoint.load={saved}", "checkpoint.finetune=true"]
    cfg = load_config(TINY, overrides)
    validate(cfg, 1)
    try:
        trainer = Trainer(cfg)
        assert trainer.step == 0 and trainer.consumed == 0
        assert trainer.engine.optimizer.optimizer.state_dict()["state"] == {}
        saved_layer = ckpt.safe_load(saved / "step00000002" / "layer_01-model_00-model_states.pt")
        live = trainer.engine.module.state_dict()
        for key, value in saved_layer.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(live[f"1.{key}"], value), key
        trainer.run()
    finally:
        parallel.shutdown()
    try:  # the same command again continues from its own checkpoint, not from `load`
        cfg = load_config(TINY, [*overrides[:-3], "train.steps=2", f"checkpoint.load={saved}",
                                 "checkpoint.finetune=true"])
        validate(cfg, 1)
        again = Trainer(cfg)
        assert again.step == 1 and again.started_from.parent == tmp_path / "ft" / "checkpoints"
    finally:
        parallel.shutdown()
