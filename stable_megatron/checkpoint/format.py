"""The checkpoint format: the one place that knows file names, the manifest, safe loading,
verification and which checkpoint of a directory is the newest complete one.

Layout of a checkpoint directory (`checkpoint.dir`, default `<run_dir>/checkpoints`):

    latest                  the tag of the last checkpoint saved (a convenience for people and
                            DeepSpeed's tools; never trusted over the scan below)
    step00000200/           one complete checkpoint ("tag" directory)
        stable_megatron.json    the manifest: step, data position, layout, resolved config,
                                code version, and the size and CRC-32 of every file (written
                                last; each checksum computed as its file was written)
        rng/rank00000.pt        each rank's random-number generator states
        layer_XX-model_YY-model_states.pt   block XX's state dict on tensor-parallel rank YY
        mp_rank_YY_model_states.pt          DeepSpeed's engine state and our client state
                                            (ZeRO-3: zero_pp_rank_D_mp_rank_YY_model_states.pt,
                                            one per data-parallel rank D)
        *optim_states.pt                    ZeRO optimizer shards, one per rank
    .tmp-step00000300/      a save in progress (or interrupted): never read, removed by the
                            next save
    .reshape/<tag>-<id>/    conversions of checkpoints this run loaded at another layout
                            (reshape.py): a verified private copy of the source and DeepSpeed's
                            universal checkpoint made from it

A checkpoint is *complete* when its manifest reads and every file it lists is present with its
recorded size. Resume, rollback, reshape, inspect and export all take the same one: the newest
complete checkpoint (`newest_complete`), by step and then save time.

A tag directory without a manifest is an unfinished save and is passed over quietly. One with
a manifest that fails verification (an unreadable manifest, a file missing, of another size, or
whose CRC-32 differs from the recorded one) is *corrupt*: `scan` reports it with the file and
the check that failed, and `mark_corrupt` leaves a `CORRUPT` file in it (one line: why) so that
every later scan, `inspect` and pruning see it without reading its files again. Sizes are
checked on every scan; checksums when a checkpoint is loaded (`verify(..., checksums=True)`),
since that reads every byte. A save killed after its
tag directory was renamed into place but before `latest` was rewritten leaves `latest` naming
the previous checkpoint; the scan still finds the new one, for every reader alike.

Loading never unpickles arbitrary objects: every file goes through `safe_load`
(`torch.load(weights_only=True)`, with three plain-data DeepSpeed classes allowlisted).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

META_FILE = "stable_megatron.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
RUN_CONFIG = "config.yaml"  # the run directory's config (two levels above a tag directory)
ENGINE_FILE = "mp_rank_00_model_states.pt"
# under ZeRO-3 every data-parallel rank writes its engine state; rank 0's stands for them all
ZERO3_ENGINE_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
RNG_DIR = "rng"
CORRUPT_MARK = "CORRUPT"  # in a tag directory: it failed verification (one line: why)
CHUNK = 1 << 24  # bytes per read when checksumming
RESHAPE_DIR = ".reshape"  # under the loading run's checkpoint directory
UNIVERSAL = "universal"
UNIVERSAL_TMP = ".tmp-universal"
UNIVERSAL_MARKER = "stable_megatron_universal.json"
SNAPSHOT = "source"
EXTRA_STATE = "_extra_state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message (one line) names the file or field."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def layer_file(index: int, tp_rank: int) -> str:
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank{rank:05d}.pt"


def layer_files(tag_dir: Path) -> dict[tuple[int, int], Path]:
    """(block index, TP rank) -> layer file of a tag directory."""
    found = {}
    for child in Path(tag_dir).iterdir():
        match = LAYER_FILE_RE.match(child.name)
        if match:
            found[int(match.group(1)), int(match.group(2))] = child
    return found


def source_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's files of a checkpoint: what its universal converter reads (and unpickles
    with weights_only=False)."""
    return sorted(p for p in Path(tag_dir).iterdir()
                  if p.is_file() and p.name.endswith(("model_states.pt", "optim_states.pt")))


def code_version() -> str:
    """The package version, plus the git commit (and `-dirty`) when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = version("stable_megatron")
    except PackageNotFoundError:
        out = "unknown"
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
            out += f"+{commit}"
        except (OSError, subprocess.SubprocessError):
            pass
    return out


# --------------------------------------------------------------------------------------------
# Safe loading


def _detail(err: BaseException) -> str:
    """The informative line of an exception message (torch's are paragraphs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to", "Unsupported", "PytorchStreamReader")):
            return line.split(". This is an internal")[0]
    return lines[-1] if lines else type(err).__name__


def engine_file(tag_dir: Path) -> Path:
    """The file of a checkpoint that holds DeepSpeed's engine state and our client state."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / ENGINE_FILE).is_file() and (tag_dir / ZERO3_ENGINE_FILE).is_file():
        return tag_dir / ZERO3_ENGINE_FILE
    return tag_dir / ENGINE_FILE


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors, containers and numbers only, never code. Any
    failure is a CheckpointError naming the file. `mmap` (zip-format files): tensors are read
    when used."""
    from stable_megatron import ds_adapter

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        with warnings.catch_warnings(), \
                torch.serialization.safe_globals(ds_adapter.checkpoint_pickle_classes()):
            warnings.simplefilter("ignore")  # torch's notices about pickle protocols
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else f" ({_detail(err)})"
        raise CheckpointError(
            f"{path}: refused: it pickles a Python object{what} other than tensors and plain "
            f"data; checkpoint files are read with weights_only=True and never unpickled as "
            f"arbitrary objects"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: truncated or corrupt ({_detail(err)})") from None


# --------------------------------------------------------------------------------------------
# The manifest


def read_meta(tag_dir: Path, missing_ok: bool = False) -> dict:
    """The manifest of a tag directory; {} if it has none and `missing_ok` (a checkpoint
    written before manifests existed: the read-only tools still read it)."""
    path = Path(tag_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt (expected a JSON object)")
    for key in ("step", "consumed_samples", "layout", "config", "files"):
        if key not in meta:
            raise CheckpointError(f"{path}: corrupt (no '{key}')")
    return meta


def verify(tag_dir: Path, meta: dict, checksums: bool = False,
           only: list[str] | None = None) -> None:
    """Every file the manifest lists is present with its recorded size; with `checksums`, also
    with its recorded CRC-32 (of the files in `only`, default all; a manifest from before
    checksums were recorded has none to compare)."""
    for rel, size in sorted(meta.get("files", {}).items()):
        path = Path(tag_dir) / rel
        if not path.is_file():
            raise CheckpointError(f"{tag_dir}: missing shard {rel}")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{tag_dir}: shard {rel} is truncated or altered ({actual} bytes, saved {size})"
            )
    if not checksums:
        return
    recorded = meta.get("checksums", {})
    for rel in sorted(recorded if only is None else set(only) & set(recorded)):
        actual = file_checksum(Path(tag_dir) / rel)
        if actual != recorded[rel]:
            raise CheckpointError(
                f"{tag_dir}: shard {rel} fails its checksum ({actual}, saved {recorded[rel]}): "
                f"altered on disk after the save"
            )


class ChecksumWriter:
    """A binary file that keeps the CRC-32 of what was written to it (`checksum`), so that a
    checkpoint file's checksum costs no second read. torch.save writes through it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._file = open(path, "wb")  # noqa: SIM115  (closed by close / the context manager)
        self._crc = 0
        self.error: OSError | None = None  # the file system's error, if a write failed

    def _io(self, call, *args):
        """`call(*args)` on the file, keeping its first OSError in `error`."""
        try:
            return call(*args)
        except OSError as err:
            self.error = self.error or err
            raise

    def write(self, data) -> int:
        self._crc = zlib.crc32(data, self._crc)
        return self._io(self._file.write, data)

    def flush(self) -> None:
        self._io(self._file.flush)

    def close(self) -> None:
        self._io(self._file.close)

    def __enter__(self) -> ChecksumWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def checksum(self) -> str:
        return f"crc32:{self._crc:08x}"


def file_checksum(path: str | os.PathLike) -> str:
    """The CRC-32 of a file's bytes, as `ChecksumWriter.checksum` writes it."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def corrupt_reason(tag_dir: Path) -> str | None:
    """Why `tag_dir` was marked corrupt, or None."""
    try:
        return (Path(tag_dir) / CORRUPT_MARK).read_text().strip() or "marked corrupt"
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return "marked corrupt"


def mark_corrupt(tag_dir: Path, reason: str) -> None:
    """Leave the `CORRUPT` mark (best effort: a read-only directory stays unmarked, and is
    found corrupt again by the next scan)."""
    try:
        (Path(tag_dir) / CORRUPT_MARK).write_text(reason.strip() + "\n")
    except OSError:
        pass


def layout_of(meta: dict) -> tuple[int, int, int]:
    lay = meta["layout"]
    return lay["tp"], lay["pp"], lay["dp"]


def describe_layout(tp: int, pp: int, dp: int) -> str:
    return f"tp {tp} x pp {pp} x dp {dp}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(meta: dict, cfg) -> None:
    """The checkpoint's model config equals this run's; names every differing field. A field the
    checkpoint does not have was added to the code after it was saved, and every model option
    is added with a default that leaves the model as it was: the checkpoint counts as having
    that default (a checkpoint from before `model.attention_gate` existed loads into a run
    without the gate and is refused by one with it)."""
    from stable_megatron.config import ModelConfig, as_dict

    defaults = _flatten(as_dict(ModelConfig()), "model.")
    saved = defaults | _flatten(meta["config"].get("model", {}), "model.")
    current = _flatten(cfg.to_dict()["model"], "model.")
    diffs = [
        f"{key} (checkpoint {saved.get(key)!r}, this run {current.get(key)!r})"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {meta.get('tag', '?')} is from an incompatible model config: "
            + "; ".join(diffs)
        )


# --------------------------------------------------------------------------------------------
# Finding the checkpoint


def scan(ckpt_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete tag directories oldest first, by step and then save time; corrupt ones with
    the reason, by name). Unfinished saves (no manifest) are in neither."""
    found, corrupt = [], []
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return [], []
    for child in sorted(ckpt_dir.iterdir()):
        if child.name.startswith(".") or not (child / META_FILE).is_file():
            continue
        reason = corrupt_reason(child)
        if reason is None:
            try:
                meta = read_meta(child)
                verify(child, meta)
            except CheckpointError as err:
                reason = str(err)
        if reason is not None:
            corrupt.append((child, reason))
            continue
        found.append((meta["step"], meta.get("saved_at", 0.0), child.name, child))
    return [path for *_, path in sorted(found)], corrupt


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete tag directories of `ckpt_dir` (manifest readable, every listed file present
    with its size, not marked corrupt), oldest first (by step, then save time)."""
    return scan(ckpt_dir)[0]


def newest_complete(ckpt_dir: Path) -> Path | None:
    """THE checkpoint of a checkpoint directory: what a resume or a rollback loads and what
    inspect, export and reshape read. `latest` is not consulted (a kill between a
    checkpoint's rename and the `latest` update leaves it behind)."""
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def latest_pointer(ckpt_dir: Path) -> str | None:
    """What `latest` says (for notes only)."""
    path = Path(ckpt_dir) / LATEST
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def resolve(path: str | os.PathLike, label: str | None = None, legacy: bool = False) -> Path:
    """The tag directory that `path` means: a tag directory itself, else the newest complete
    checkpoint of the checkpoint directory `path` (or of `path/checkpoints`, a run directory).
    `label` prefixes messages (e.g. "checkpoint.load"); `legacy` also accepts a tag directory
    without a manifest (the read-only tools)."""
    path = Path(path)
    name = f"{label}={path}" if label else str(path)
    if not path.exists():
        raise CheckpointError(f"{name}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(
            f"{name}: is a file; expected a checkpoint directory or one checkpoint's directory "
            f"(e.g. step00000020/)"
        )
    if (path / META_FILE).is_file() or (legacy and layer_files(path)):
        return path
    for directory in (path, path / "checkpoints"):
        found = newest_complete(directory)
        if found is not None:
            return found
    if any(path.glob("*model_states.pt")):
        raise CheckpointError(
            f"{name}: has DeepSpeed files but no {META_FILE}: an incomplete save or a checkpoint "
            f"not written by stable_megatron"
        )
    raise CheckpointError(
        f"{name}: not a checkpoint: expected {META_FILE} (one checkpoint) or step directories "
        f"with it (a checkpoint directory, or a run directory's checkpoints/)"
        + (f"; a checkpoint saved without {META_FILE} is read by naming its directory"
           if legacy else "")
    )
