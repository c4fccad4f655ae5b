"""Corruption is never skipped in silence: a finished checkpoint whose files fail verification
(a truncated shard: its size; a flipped bit: its checksum) is reported in one line naming the
checkpoint, the file and the check, marked CORRUPT, recorded as an event, and then passed over
for the newest verified checkpoint (or, with checkpoint.on_corrupt=stop, the run stops)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from stable_megatron import checkpoint as ckpt
from stable_megatron.checkpoint import format as fmt
from stable_megatron.train import main
from tests.unit.test_checkpoint import SMALL as BASE
from tests.unit.test_checkpoint import TINY

SMALL = [*BASE, "checkpoint.interval=2", "checkpoint.keep=0"]


@pytest.fixture(scope="module")
def run4(tmp_path_factory, data_cache) -> Path:
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("corrupt") / "run"
    assert main([TINY, *SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={run}",
                 "train.steps=4"]) == 0
    return run


def rerun(source: Path, tmp_path: Path, data_cache, capsys, *extra) -> tuple[int, str, Path]:
    """The same command again on a copy of `source` (6 steps now); (exit code, stderr, run);
    stdout must say where it resumed."""
    run = tmp_path / "run"
    shutil.copytree(source, run)
    code = main([TINY, *SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={run}",
                 "train.steps=6", *extra])
    out = capsys.readouterr()
    rerun.resumed = out.out
    return code, out.err, run


def events(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "corrupt_checkpoint"]


def test_the_manifest_records_each_file_checksum_as_written(run4):
    tag = run4 / "checkpoints" / fmt.tag_for(4)
    meta = ckpt.read_meta(tag)
    assert set(meta["checksums"]) == set(meta["files"])
    for rel, crc in meta["checksums"].items():
        assert crc == fmt.file_checksum(tag / rel), rel
    fmt.verify(tag, meta, checksums=True)
    # every file went through the checksum writer (DeepSpeed's too): none needed a second read
    save = importlib.import_module("stable_megatron.checkpoint.save")
    staging = str(Path(f"{fmt.TMP_PREFIX}{tag.name}") / tag.name) + "/"
    assert {p.split(staging, 1)[1] for p in save._WRITTEN} == set(meta["files"])


def test_a_truncated_shard_is_reported_marked_and_passed_over(run4, tmp_path, data_cache,
                                                              capsys):
    source = tmp_path / "source"
    shutil.copytree(run4, source)
    tag4 = source / "checkpoints" / fmt.tag_for(4)
    shard = next(tag4.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    code, err, run = rerun(source, tmp_path, data_cache, capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "corrupt" in line]
    assert len(lines) == 1
    assert ("checkpoint step00000004 is corrupt and passed over: " in lines[0]
            and f"shard {shard.name} is truncated or altered" in lines[0]
            and "resuming from step00000002 instead" in lines[0])
    assert [e["tag"] for e in events(run)] == ["step00000004"]
    assert events(run)[0]["step"] == 2 and events(run)[0]["instead"] == "step00000002"
    assert "resumed at step 2 from" in rerun.resumed and fmt.tag_for(2) in rerun.resumed
    assert (run / "checkpoints" / fmt.tag_for(6)).is_dir()


def test_a_flipped_bit_fails_the_checksum(run4, tmp_path, data_cache, capsys):
    source = tmp_path / "source"
    shutil.copytree(run4, source)
    tag4 = source / "checkpoints" / fmt.tag_for(4)
    shard = tag4 / "layer_01-model_00-model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    assert fmt.complete_checkpoints(source / "checkpoints")[-1] == tag4  # sizes cannot tell
    code, err, run = rerun(source, tmp_path, data_cache, capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "corrupt" in line]
    assert len(lines) == 1 and f"shard {shard.name} fails its checksum" in lines[0]
    assert "resuming from step00000002 instead" in lines[0]
    assert [e["tag"] for e in events(run)] == ["step00000004"]


def test_the_mark_is_seen_by_scan_inspect_and_pruning(run4, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run4 / "checkpoints", ckpts)
    tag2, tag4 = ckpts / fmt.tag_for(2), ckpts / fmt.tag_for(4)
    fmt.mark_corrupt(tag4, "shard x fails its checksum")
    complete, corrupt = fmt.scan(ckpts)
    assert complete == [tag2] and corrupt == [(tag4, "shard x fails its checksum")]
    from stable_megatron.checkpoint.view import open_checkpoint

    assert open_checkpoint(ckpts).tag_dir == tag2
    assert any("step00000004 is corrupt" in note for note in open_checkpoint(ckpts).notes)
    assert any("marked corrupt" in note for note in open_checkpoint(tag4).notes)
    assert ckpt.prune(ckpts, keep=1) == [] and tag4.is_dir()  # neither kept nor deleted


def test_on_corrupt_stop_ends_the_run_with_the_line(run4, tmp_path, data_cache, capsys):
    source = tmp_path / "source"
    shutil.copytree(run4, source)
    shard = next((source / "checkpoints" / fmt.tag_for(4)).glob("*optim_states.pt"))
    shard.write_bytes(b"")
    code, err, _ = rerun(source, tmp_path, data_cache, capsys, "checkpoint.on_corrupt=stop")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "checkpoint" in err and "step00000004 is corrupt" in err and shard.name in err
    assert "checkpoint.on_corrupt=stop" in err


def test_an_unfinished_save_is_passed_over_quietly(run4, tmp_path, data_cache, capsys):
    source = tmp_path / "source"
    shutil.copytree(run4, source)
    (source / "checkpoints" / fmt.tag_for(4) / fmt.META_FILE).unlink()  # never finished
    code, err, run = rerun(source, tmp_path, data_cache, capsys)
    assert code == 0 and "corrupt" not in err and not events(run)
