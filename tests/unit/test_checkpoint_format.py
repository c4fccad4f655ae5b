"""The checkpoint format's one rule for "which checkpoint", across every reader: a save killed
after its tag directory was renamed into place but before `latest` was rewritten leaves
`latest` naming the older checkpoint; resume, rollback, inspect, export and the reshape tool
all take the newer, complete one. Also: the private, verified copy a reshape converts from."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from stable_megatron import checkpoint as ckpt
from stable_megatron import parallel
from stable_megatron.checkpoint import export, reshape
from stable_megatron.checkpoint import format as fmt
from stable_megatron.config import load_config, validate
from stable_megatron.train import Trainer, main
from tests.unit.test_checkpoint import SMALL, TINY

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data_cache) -> Path:
    """A run whose step-2 save dies after the rename, before `latest`: returns the run dir."""
    saving = importlib.import_module("stable_megatron.checkpoint.save")
    run = tmp_path_factory.mktemp("killed") / "run"
    real = saving.write_latest

    def write_latest(ckpt_dir, tag):
        if tag == fmt.tag_for(2):
            raise OSError("killed before `latest` was rewritten")
        real(ckpt_dir, tag)

    saving.write_latest = write_latest
    try:
        code = main([TINY, *SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={run}",
                     "train.steps=2", "checkpoint.interval=1", "checkpoint.keep=0"])
    finally:
        saving.write_latest = real
    assert code == 2  # the save failed...
    ckpt_dir = run / "checkpoints"
    assert (ckpt_dir / fmt.LATEST).read_text() == fmt.tag_for(1)  # ...`latest` is stale...
    assert (ckpt_dir / fmt.tag_for(2) / fmt.META_FILE).is_file()  # ...step 2 is in place
    return run


def test_every_reader_names_the_newest_complete_checkpoint(killed, tmp_path, data_cache, capsys):
    ckpt_dir = killed / "checkpoints"
    newest = ckpt_dir / fmt.tag_for(2)
    assert fmt.newest_complete(ckpt_dir) == newest
    assert fmt.resolve(ckpt_dir) == fmt.resolve(killed) == newest
    # inspect
    capsys.readouterr()
    assert load_tool("inspect_checkpoint").main([str(ckpt_dir)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint   {newest}\n" in out and "step         2 " in out
    assert "`latest` names step00000001, not the newest complete checkpoint" in out
    # export
    target = tmp_path / "w.safetensors"
    assert load_tool("export_checkpoint").main(
        [str(killed), "--format", "safetensors", "--out", str(target)]) == 0
    assert f"from {newest} (step 2)" in capsys.readouterr().out
    assert export.read_safetensors(target)[1]["checkpoint"]["tag"] == newest.name
    # the offline reshape tool resolves the same way
    assert reshape.cache_for(tmp_path, fmt.resolve(ckpt_dir)).name.startswith("step00000002-")
    # resume (and rollback: Trainer.rollback takes the same format.newest_complete)
    cfg = load_config(TINY, [*SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={killed}",
                             "train.steps=3"])
    validate(cfg, 1)
    try:
        trainer = Trainer(cfg)
        assert trainer.started_from == newest and trainer.step == 2
    finally:
        parallel.shutdown()


def test_incomplete_newer_checkpoints_are_skipped(tmp_path):
    d = tmp_path / "ckpts"
    for step in (1, 2, 3):
        tag = d / fmt.tag_for(step)
        tag.mkdir(parents=True)
        (tag / "shard.pt").write_bytes(b"x" * step)
        (tag / fmt.META_FILE).write_text(json.dumps(
            {"step": step, "consumed_samples": step, "layout": {}, "config": {},
             "files": {"shard.pt": step}, "saved_at": step}))
    (d / fmt.LATEST).write_text(fmt.tag_for(3))
    (d / fmt.tag_for(3) / "shard.pt").write_bytes(b"x")  # truncated: not complete
    (d / fmt.tag_for(4)).mkdir()  # no manifest
    (d / fmt.tag_for(4) / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert fmt.complete_checkpoints(d) == [d / fmt.tag_for(1), d / fmt.tag_for(2)]
    assert fmt.newest_complete(d) == fmt.resolve(d) == d / fmt.tag_for(2)
    # named directly, the broken ones are refused with the reason
    with pytest.raises(fmt.CheckpointError, match="shard shard.pt is truncated or altered"):
        fmt.verify(d / fmt.tag_for(3), fmt.read_meta(d / fmt.tag_for(3)))
    with pytest.raises(fmt.CheckpointError, match="has DeepSpeed files but no"):
        fmt.resolve(d / fmt.tag_for(4), label="checkpoint.load")


# ------------------------------------------------------------------ the reshape source copy


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def fake_checkpoint(tag: Path) -> bytes:
    tag.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, tag / fmt.layer_file(0, 0))
    torch.save({"module": None}, tag / fmt.ENGINE_FILE)
    torch.save({"state": torch.zeros(2)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "rng").mkdir()
    torch.save({}, tag / fmt.rng_file(0))
    files = {str(p.relative_to(tag)): p.stat().st_size for p in tag.rglob("*") if p.is_file()}
    raw = json.dumps({"step": 1, "consumed_samples": 0, "layout": {}, "config": {},
                      "files": files}).encode()
    (tag / fmt.META_FILE).write_bytes(raw)
    return raw


def test_reshape_converts_a_verified_private_copy(tmp_path):
    source = tmp_path / "other-run" / "checkpoints" / "step00000001"
    raw = fake_checkpoint(source)
    snap = reshape._snapshot(source, raw, tmp_path / "mine" / "source")
    names = sorted(p.name for p in snap.iterdir())
    assert names == sorted([fmt.layer_file(0, 0), fmt.ENGINE_FILE, fmt.META_FILE,
                            "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    for name in names:  # copies, not links: a later write to the source cannot reach them
        assert os.stat(snap / name).st_ino != os.stat(source / name).st_ino
    torch.save({"w": torch.zeros(3)}, source / fmt.layer_file(0, 0))
    assert torch.equal(fmt.safe_load(snap / fmt.layer_file(0, 0))["w"], torch.ones(3))
    # the cache lives under the loading run's checkpoint directory, named by the manifest
    cache = reshape.cache_for(tmp_path / "mine", source)
    assert cache.parent == tmp_path / "mine" / fmt.RESHAPE_DIR
    assert cache.name.startswith("step00000001-")


def test_reshape_copy_refuses_altered_or_unsafe_files(tmp_path):
    source = tmp_path / "src" / "step00000001"
    raw = fake_checkpoint(source)
    torch.save({"w": torch.ones(1000)}, source / fmt.layer_file(0, 0))  # another size
    with pytest.raises(fmt.CheckpointError, match="is truncated or altered"):
        reshape._snapshot(source, raw, tmp_path / "a")
    marker = tmp_path / "marker"
    victim = source / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"state": _Payload(marker)}, victim)
    meta = json.loads(raw)
    meta["files"][victim.name] = victim.stat().st_size
    meta["files"][fmt.layer_file(0, 0)] = (source / fmt.layer_file(0, 0)).stat().st_size
    with pytest.raises(fmt.CheckpointError, match="refused"):
        reshape._snapshot(source, json.dumps(meta).encode(), tmp_path / "b")
    assert not marker.exists()
    assert ckpt.CheckpointError is fmt.CheckpointError


def test_a_model_field_added_after_the_save_counts_as_its_default():
    """A checkpoint saved before a model option existed has no entry for it: it is compatible
    with a run that leaves the option at its default and refused by one that sets it."""
    from stable_megatron.checkpoint.format import CheckpointError, check_compatible
    from stable_megatron.config import config_from_dict

    cfg = config_from_dict({"model": {"hidden_size": 64}})
    old = cfg.to_dict()
    del old["model"]["attention_gate"]
    del old["model"]["qk_clip"]
    check_compatible({"config": old, "tag": "step1"}, cfg)
    gated = config_from_dict({"model": {"hidden_size": 64, "attention_gate": True}})
    with pytest.raises(CheckpointError, match=r"model.attention_gate \(checkpoint False, this "
                                              r"run True\)"):
        check_compatible({"config": old, "tag": "step1"}, gated)
    old["model"]["hidden_size"] = 128  # a saved field still counts as saved
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        check_compatible({"config": old, "tag": "step1"}, cfg)
