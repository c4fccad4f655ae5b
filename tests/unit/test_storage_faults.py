"""Storage faults: a save that fails (no space, permission, I/O error) ends the run with one line
naming the path and the cause, leaves the previous checkpoint intact and still the newest
complete one (never pruned first), and a rerun resumes from it; a run directory that cannot be
written stops the run before its first step."""

from __future__ import annotations

import errno
import os

import pytest

from stable_megatron import checkpoint as ckpt
from stable_megatron.checkpoint import format as fmt
from stable_megatron.train import main
from tests.unit.test_checkpoint import SMALL as BASE
from tests.unit.test_checkpoint import TINY

SMALL = [*BASE, "checkpoint.interval=2", "checkpoint.keep=1"]


def run(tmp_path, data_cache, *extra) -> int:
    return main([TINY, *SMALL, f"data.cache_dir={data_cache}",
                 f"train.run_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("code,cause", [
    (errno.ENOSPC, "No space left on device"),
    (errno.EACCES, "Permission denied"),
    (errno.EIO, "Input/output error"),
])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, data_cache, capsys, monkeypatch,
                                                     code, cause):
    """The fault hits the writes of the step-4 checkpoint (DeepSpeed's shards and our RNG
    files alike go through the checksum writer), after some bytes of each file."""
    real_write = fmt.ChecksumWriter.write
    real_init = fmt.ChecksumWriter.__init__

    def init(self, path):
        real_init(self, path)
        self.faulty = fmt.tag_for(4) in str(path)

    def write(self, data):
        if self.faulty:
            self.error = OSError(code, os.strerror(code))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(fmt.ChecksumWriter, "__init__", init)
    monkeypatch.setattr(fmt.ChecksumWriter, "write", write)
    assert run(tmp_path, data_cache, "train.steps=4") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("error: checkpoint save at step 4 failed: ")
    assert f"{fmt.tag_for(4)}/" in err and f"{cause} (errno {code})" in err
    assert err.endswith("the previous checkpoint step00000002 is intact and still the newest "
                        "complete one")
    ckpts = tmp_path / "run" / "checkpoints"
    assert ckpt.newest_complete(ckpts) == ckpts / fmt.tag_for(2)  # keep=1 pruned nothing
    assert not any(p.name.startswith(fmt.TMP_PREFIX) for p in ckpts.iterdir())
    fmt.verify(ckpts / fmt.tag_for(2), ckpt.read_meta(ckpts / fmt.tag_for(2)), checksums=True)

    monkeypatch.undo()  # the disk is fine again: the same command resumes from step 2
    assert run(tmp_path, data_cache, "train.steps=4") == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert ckpt.newest_complete(ckpts) == ckpts / fmt.tag_for(4)


def test_a_run_directory_that_cannot_be_written_stops_before_training(tmp_path, data_cache,
                                                                      capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = main([TINY, *SMALL, f"data.cache_dir={data_cache}",
                 f"train.run_dir={blocker / 'run'}", "train.steps=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == (f"error: train.run_dir={blocker / 'run'}: cannot write there: Not a "
                   f"directory (errno {errno.ENOTDIR})")


def test_an_unwritable_checkpoint_directory_stops_before_training(tmp_path, data_cache, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = run(tmp_path, data_cache, "train.steps=2", f"checkpoint.dir={blocker / 'ckpts'}")
    captured = capsys.readouterr()
    assert code == 2 and "checkpoint.dir=" in captured.err and "cannot write there" in \
        captured.err
    assert "step 1/" not in captured.out and not (tmp_path / "run" / "metrics.jsonl").exists()
