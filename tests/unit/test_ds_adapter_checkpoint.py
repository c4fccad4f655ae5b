"""The DeepSpeed behaviours the checkpoint functions of `stable_megatron/ds_adapter.py` rely
on, checked against the installed DeepSpeed on a real one-process run and its checkpoint: each
test fails when the behaviour its function's comment names changes."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from stable_megatron import ds_adapter, parallel
from stable_megatron.checkpoint import format as fmt
from stable_megatron.config import load_config, validate
from stable_megatron.train import Trainer, main
from tests.unit.test_checkpoint import SMALL, TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    """A one-step run with a checkpoint; returns (overrides resuming it, its tag directory)."""
    run_dir = tmp_path_factory.mktemp("adapter") / "run"
    overrides = [*SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={run_dir}"]
    assert main([TINY, *overrides, "train.steps=1", "checkpoint.interval=1"]) == 0
    return [*overrides, "train.steps=2"], run_dir / "checkpoints" / fmt.tag_for(1)


@pytest.fixture(scope="module")
def resumed(run):
    """A Trainer resumed from that checkpoint, and every path DeepSpeed read through us."""
    overrides, _ = run
    saving = importlib.import_module("stable_megatron.checkpoint.save")
    real, reads = saving.safe_load, []

    def spy(path, map_location="cpu", mmap=False):
        reads.append(str(path))
        return real(path, map_location=map_location, mmap=mmap)

    saving.safe_load = spy
    cfg = load_config(TINY, overrides)
    validate(cfg, 1)
    try:
        trainer = Trainer(cfg)
    finally:
        saving.safe_load = real
    yield trainer, reads
    parallel.shutdown()


def test_checkpoint_pickle_classes_are_all_a_save_needs(run):
    _, tag = run
    files = [p for p in tag.rglob("*.pt")]
    assert any(p.name.endswith("optim_states.pt") for p in files)
    for path in files:  # every file of a real save loads with weights_only and these classes
        fmt.safe_load(path)
    classes = {c.__name__ for c in ds_adapter.checkpoint_pickle_classes()}
    assert classes == {"LossScaler", "ZeroStageEnum", "fragment_address"}


def test_deepspeed_reads_checkpoints_through_checkpoint_engine_load(run, resumed):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    _, tag = run
    trainer, reads = resumed
    assert callable(TorchCheckpointEngine.load)
    assert list(inspect.signature(TorchCheckpointEngine.load).parameters)[:3] == [
        "self", "path", "map_location"]
    assert isinstance(trainer.engine.checkpoint_engine, TorchCheckpointEngine)
    assert type(trainer.engine.checkpoint_engine) is not TorchCheckpointEngine  # ours
    # the resume's model, layer and optimizer files all went through our loader
    read = {p.rsplit("/", 1)[-1] for p in reads}
    for path in tag.iterdir():
        if path.name.endswith(("model_states.pt", "optim_states.pt")):
            assert path.name in read, path.name


def test_load_universal_checkpoint_is_read_at_load_time(resumed):
    trainer, _ = resumed
    engine = trainer.engine
    assert hasattr(engine._config, "load_universal_checkpoint")
    assert engine.load_universal_checkpoint() is False
    with ds_adapter.universal_loading(engine):
        assert engine.load_universal_checkpoint() is True  # the engine's own accessor
    assert engine.load_universal_checkpoint() is False
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "load_universal_checkpoint()" in inspect.getsource(DeepSpeedEngine._load_checkpoint)


def test_stage_blocks_are_the_saved_layer_files(run, resumed):
    _, tag = run
    trainer, _ = resumed
    pipe = trainer.engine.module
    assert isinstance(pipe._layer_specs, list) and pipe._local_start == 0
    blocks = ds_adapter.stage_blocks(pipe)
    saved = sorted({index for index, _ in fmt.layer_files(tag)})
    assert [index for index, _ in blocks] == saved
    for index, module in blocks:
        state = fmt.safe_load(tag / fmt.layer_file(index, 0))
        assert set(state) == set(module.state_dict()), index


def test_universal_checkpoint_info_is_saved_with_the_engine_state(run, resumed):
    from deepspeed.checkpoint import constants

    _, tag = run
    trainer, _ = resumed
    assert constants.UNIVERSAL_CHECKPOINT_INFO == ds_adapter.UNIVERSAL_INFO_ATTR
    saved = fmt.safe_load(tag / fmt.ENGINE_FILE)[constants.UNIVERSAL_CHECKPOINT_INFO]
    assert saved == getattr(trainer.engine.module, ds_adapter.UNIVERSAL_INFO_ATTR)
    assert saved[constants.ORIGINAL_VOCAB_SIZE] > 0


def test_refresh_master_weights_copies_the_module_into_zero(resumed):
    trainer, _ = resumed
    engine = trainer.engine
    assert callable(engine.optimizer.refresh_fp32_params)
    with torch.no_grad():
        for param in engine.module.parameters():
            param.fill_(0.25)
    ds_adapter.refresh_master_weights(engine)
    for flat in engine.optimizer.single_partition_of_fp32_groups:
        assert torch.all(flat == 0.25)
