"""Megatron-core indexed datasets (.bin/.idx): building, caching and fixed-length windows."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from stable_megatron.data import DataError
from stable_megatron.data.corpus import builtin_corpus_files, split_train_val
from stable_megatron.data.tokenizer import Tokenizer, train_tokenizer

if TYPE_CHECKING:
    from numpy.typing import NDArray

CACHE_VERSION = "1"
VAL_FRACTION = 0.05
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DataPaths:
    """Where prepare_builtin_data put its outputs (prefixes name <prefix>.bin/.idx pairs)."""

    tokenizer_model: Path
    train_prefix: Path
    val_prefix: Path
    vocab_size: int


@dataclass(frozen=True)
class BuildStats:
    num_documents: int
    num_tokens: int


def indexed_dataset_module() -> ModuleType:
    """Import megatron.core.datasets.indexed_dataset lazily (it pulls in all of megatron.core,
    ~5 s, and warns about missing Apex/Transformer Engine, which is expected on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# ----------------------------------------------------------------------------- building


def write_token_documents(
    documents: Iterable[Sequence[int] | NDArray[np.integer]], out_prefix: PathLike, vocab_size: int
) -> BuildStats:
    """Write already-tokenized documents, one sequence per document, as <out_prefix>.bin/.idx,
    with megatron-core's smallest adequate token dtype (uint16 for vocab_size < 65500)."""
    module = indexed_dataset_module()
    dtype = module.DType.optimal_dtype(vocab_size)
    prefix = os.fspath(out_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = module.IndexedDatasetBuilder(module.get_bin_path(prefix), dtype=dtype)
    num_docs = num_tokens = 0
    for tokens in documents:
        array = np.asarray(tokens, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= vocab_size):
            raise DataError(f"token id out of range [0, {vocab_size}) in document {num_docs}")
        builder.add_document(array.astype(dtype), [array.size])
        num_docs += 1
        num_tokens += array.size
    builder.finalize(module.get_idx_path(prefix))
    return BuildStats(num_docs, num_tokens)


def build_indexed_dataset(
    documents: Iterable[str], tokenizer: Tokenizer, out_prefix: PathLike
) -> BuildStats:
    """Tokenize documents (blank ones are skipped), append EOD to each, write .bin/.idx."""

    def encoded() -> Iterator[list[int]]:
        for text in documents:
            if text.strip():
                yield tokenizer.encode(text) + [tokenizer.eod_id]

    return write_token_documents(encoded(), out_prefix, tokenizer.vocab_size)


# ----------------------------------------------------------------------------- reading


def load_tokens(prefix: PathLike) -> NDArray[np.integer]:
    """All tokens of an indexed dataset as one flat read-only memmap, after checking that
    megatron-core's IndexedDataset opens it and that the .bin size matches the .idx."""
    prefix = os.fspath(prefix)
    module = indexed_dataset_module()
    bin_path, idx_path = module.get_bin_path(prefix), module.get_idx_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: indexed dataset file not found")
    actual = os.path.getsize(bin_path)
    if actual == 0:
        raise DataError(f"{bin_path}: empty data file (no tokens)")
    dtype, expected = _check_index(module, prefix, idx_path)
    if actual != expected:
        raise DataError(f"{bin_path}: truncated or corrupt ({actual} bytes, index says {expected})")
    return np.memmap(bin_path, dtype=dtype, mode="r")


def _check_index(module: ModuleType, prefix: str, idx_path: str) -> tuple[np.dtype, int]:
    """Check the .idx layout, then open with megatron-core's IndexedDataset (which asserts its
    own invariants); return (token dtype, expected .bin size in bytes)."""
    _check_idx_layout(module, idx_path)
    try:
        indexed = module.IndexedDataset(prefix)
    except (AssertionError, ValueError, struct.error) as exc:
        raise DataError(f"{idx_path}: corrupt index ({exc or type(exc).__name__})") from None
    dtype = np.dtype(indexed.index.dtype)
    num_tokens = int(np.asarray(indexed.sequence_lengths, dtype=np.int64).sum())
    return dtype, num_tokens * dtype.itemsize


def _check_idx_layout(module: ModuleType, idx_path: str) -> None:
    """Validate header and size up front: megatron-core only asserts the header, and an
    IndexedDataset whose constructor fails raises again (AttributeError) in __del__."""
    header = module._INDEX_HEADER
    with open(idx_path, "rb") as stream:
        head = stream.read(len(header) + 8 + 1 + 8 + 8)
    fixed = struct.Struct(f"<{len(header)}sQBQQ")
    if len(head) < fixed.size or head[: len(header)] != header:
        raise DataError(f"{idx_path}: truncated or corrupt index (bad header)")
    _, version, code, num_sequences, num_documents = fixed.unpack(head)
    if version != 1 or code not in {d.value for d in module.DType}:
        raise DataError(f"{idx_path}: unsupported index (version {version}, dtype code {code})")
    expected = fixed.size + 12 * num_sequences + 8 * num_documents
    if os.path.getsize(idx_path) != expected:
        raise DataError(f"{idx_path}: truncated or corrupt index ({expected} bytes expected)")


class TokenWindowDataset:
    """Non-overlapping windows of seq_len + 1 tokens over the flat token stream of an indexed
    dataset (documents are joined, EOD-separated). Index i >= 0 maps to epoch i // len(self),
    whose window order is a permutation seeded by seed + epoch, so any i is valid."""

    def __init__(self, prefix: PathLike, seq_len: int, seed: int = 1234) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.prefix = Path(prefix)
        self.seq_len = seq_len
        self.seed = seed
        self._tokens = load_tokens(prefix)
        self.num_tokens = int(self._tokens.size)
        if self.num_tokens < self.window:
            raise DataError(
                f"{self.prefix}: only {self.num_tokens} tokens, need at least seq_len + 1 = "
                f"{self.window}"
            )
        self._num_windows = self.num_tokens // self.window
        self._permutations: dict[int, NDArray[np.int64]] = {}

    @property
    def window(self) -> int:
        return self.seq_len + 1

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, index: int) -> NDArray[np.int64]:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        epoch, position = divmod(int(index), self._num_windows)
        start = int(self._permutation(epoch)[position]) * self.window
        return np.array(self._tokens[start : start + self.window], dtype=np.int64)

    def _permutation(self, epoch: int) -> NDArray[np.int64]:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.default_rng(self.seed + epoch)
            self._permutations[epoch] = rng.permutation(self._num_windows)
        return self._permutations[epoch]

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_tokens"] = (state["_tokens"].filename, state["_tokens"].dtype)
        state["_permutations"] = {}
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        filename, dtype = state.pop("_tokens")  # type: ignore[misc]
        self.__dict__.update(state)
        self._tokens = np.memmap(filename, dtype=dtype, mode="r")


def unigram_perplexity(train_prefix: PathLike, val_prefix: PathLike, vocab_size: int) -> float:
    """Perplexity of the val tokens under the add-one-smoothed unigram distribution of the
    train tokens: the baseline that a trained language model must beat."""
    train, val = load_tokens(train_prefix), load_tokens(val_prefix)
    for name, tokens in (("train", train), ("val", val)):
        if int(tokens.max()) >= vocab_size:
            raise DataError(f"{name} tokens exceed vocab_size {vocab_size}")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - math.log(counts.sum())
    return float(math.exp(-log_probs[val].mean()))


# ----------------------------------------------------------------------------- caching


def prepare_builtin_data(cache_dir: PathLike, vocab_size: int = 8192) -> DataPaths:
    """Tokenizer plus train/val indexed datasets of the built-in corpus, cached in cache_dir."""
    return prepare_data(builtin_corpus_files(), cache_dir, vocab_size, name="sotu")


def prepare_data(
    files: Sequence[Path], cache_dir: PathLike, vocab_size: int = 8192, name: str = "corpus"
) -> DataPaths:
    """Like prepare_builtin_data for any .txt files (one document per file). Cached under a
    key of name, version, vocab size and the files' names and sizes. Safe to call from several
    processes at once: one builds under a file lock, the others wait and reuse its result."""
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-v{CACHE_VERSION}-vocab{vocab_size}-{_fingerprint(files)}"
    if not _is_complete(final):
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(cache_dir / f".{final.name}.lock"):
            if not _is_complete(final):
                _build_cache(files, final, vocab_size)
    return _data_paths(final)


def _fingerprint(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{Path(path).name}\0{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()[:10]


def _is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def _data_paths(directory: Path) -> DataPaths:
    meta = json.loads((directory / "meta.json").read_text())
    return DataPaths(
        tokenizer_model=directory / "tokenizer.model",
        train_prefix=directory / "train",
        val_prefix=directory / "val",
        vocab_size=int(meta["vocab_size"]),
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process to finish building {path.name[1:-5]}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_cache(files: Sequence[Path], final: Path, vocab_size: int) -> None:
    """Build into a private temp dir, then os.replace it into place (we hold the lock)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed build
    shutil.rmtree(final, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = _build_into(files, tmp, vocab_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_into(files: Sequence[Path], out_dir: Path, vocab_size: int) -> dict[str, object]:
    train_files, val_files = split_train_val(files, VAL_FRACTION)
    indexed_dataset_module()  # import megatron-core up front so that phase timings are honest
    started = time.monotonic()
    _log(f"training tokenizer (BPE, vocab {vocab_size}) on {len(train_files)} files ...", end="")
    tokenizer = train_tokenizer(train_files, out_dir / "tokenizer", vocab_size)
    _log(f" done ({time.monotonic() - started:.1f}s)", prefix=False)
    meta: dict[str, object] = {"version": CACHE_VERSION, "vocab_size": tokenizer.vocab_size}
    for split, split_files in (("train", train_files), ("val", val_files)):
        stats = _encode_files(split_files, tokenizer, out_dir / split, split)
        meta[f"{split}_files"] = [p.name for p in split_files]
        meta[f"{split}_tokens"] = stats.num_tokens
    return meta


def _encode_files(
    files: Sequence[Path], tokenizer: Tokenizer, prefix: Path, split: str
) -> BuildStats:
    started = time.monotonic()
    label = f"encoding {len(files)} {split} docs ..."
    texts = (p.read_text(encoding="utf-8") for p in _with_progress(files, label))
    stats = build_indexed_dataset(texts, tokenizer, prefix)
    elapsed = time.monotonic() - started
    _log(f" done ({stats.num_tokens:,} tokens, {elapsed:.1f}s)", prefix=False)
    return stats


def _with_progress(items: Sequence[Path], label: str) -> Iterator[Path]:
    """Yield items while showing "label  37%" on stderr (updated in place on a terminal);
    leaves the line open for the caller to finish."""
    tty = sys.stderr.isatty()
    _log(label, end="")
    for done, item in enumerate(items):
        if tty:
            _log(f"\r[data] {label} {100 * done // len(items):3d}%", prefix=False, end="")
        yield item
    if tty:
        _log(f"\r[data] {label}     ", prefix=False, end="")


def _log(message: str, prefix: bool = True, end: str = "\n") -> None:
    sys.stderr.write(("[data] " if prefix else "") + message + end)
    sys.stderr.flush()
