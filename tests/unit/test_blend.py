"""megatron-core's blended datasets (data.source=blended): Megatron's blend syntax, the
proportions drawn, the windows our loop reads, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from stable_megatron.config import ConfigError, config_from_dict, validate
from stable_megatron.data.blend import parse_blend, parse_split


def test_blend_syntax():
    b = parse_blend("data.blend", ["0.25", "data/a", "0.75", "data/b"])
    assert b.prefixes == ["data/a", "data/b"] and b.weights == [0.25, 0.75]
    assert parse_blend("data.blend", ["data/a", "data/b"]).weights is None
    for bad, match in ((["0.3", "data/a", "data/b"], "alternating"),
                       (["data/a", "0.3"], "alternating"),
                       (["-1", "data/a"], "weight -1.0 is not a positive number"),
                       (["0", "data/a"], "weight 0.0 is not a positive number"),
                       ([], "is empty")):
        with pytest.raises(ValueError, match=match):
            parse_blend("data.blend", bad)
    assert parse_split("99,1,0") == [99.0, 1.0, 0.0]
    for bad in ("99,1", "0,1,0", "a,b,c", "99,-1,0"):
        with pytest.raises(ValueError, match="data.split"):
            parse_split(bad)


@pytest.fixture(scope="module")
def corpus(data_cache):
    from stable_megatron.data.dataset import prepare_builtin_data

    return prepare_builtin_data(data_cache, vocab_size=1024)


def _cfg(corpus, data_cache, tmp_path, **data):
    base = {"source": "blended", "tokenizer_model": str(corpus.tokenizer_model),
            "blend": ["0.25", str(corpus.train_prefix), "0.75", str(corpus.val_prefix)],
            "split": "90,10,0", "cache_dir": str(tmp_path / "cache"), "vocab_size": 1024}
    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                  "seq_length": 32},
        "train": {"steps": 50, "micro_batch_size": 4, "global_batch_size": 8,
                  "eval_interval": 10, "eval_iters": 2},
        "data": {**base, **data}})


def test_errors_are_one_line_and_name_the_problem(corpus, data_cache, tmp_path):
    cases = [
        ({"blend": ["0.5", str(corpus.train_prefix), "0.5", "/nowhere/web"]},
         "data.blend: missing /nowhere/web.bin"),
        ({"blend": ["0.5", str(corpus.train_prefix), "x", str(corpus.val_prefix)]},
         "alternating"),
        ({"blend": ["2", str(corpus.train_prefix), "-1", str(corpus.val_prefix)]},
         "data.blend: weight -1.0 is not a positive number"),
        ({"blend": None}, "data.blend is required"),
        ({"split": "1,1"}, "data.split='1,1'"),
        ({"val_blend": ["/nowhere/val"]}, "data.val_blend: missing /nowhere/val.bin"),
        ({"tokenizer_model": str(tmp_path / "none.model")}, "no such file"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as err:
            validate(_cfg(corpus, data_cache, tmp_path, **data), 1)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_proportions_windows_and_the_cache(corpus, data_cache, tmp_path, world_of_one):
    """0.25 / 0.75: the samples drawn from each corpus (megatron-core's BlendedDataset keeps
    the running proportions within one sample); every window is seq_length + 1 tokens of the
    corpus it names; a second build reads the cached indices and gives the same samples."""
    from stable_megatron.data import blend
    from stable_megatron.data.tokenizer import Tokenizer

    cfg = _cfg(corpus, data_cache, tmp_path)
    validate(cfg, 1)
    tok = Tokenizer(corpus.tokenizer_model)
    train, val = blend.build(cfg, str(corpus.tokenizer_model), tok.eod_id, tok.vocab_size)
    n = cfg.train.steps * cfg.train.global_batch_size
    assert len(train) == n and val is not None and len(val) == 2 * 8
    sources = np.array([train.source(i) for i in range(n)])
    assert abs((sources == 0).mean() - 0.25) <= 1 / n
    assert abs((sources == 1).mean() - 0.75) <= 1 / n
    window = train[3]
    assert window.shape == (33,) and window.dtype == np.int64
    assert window.min() >= 0 and window.max() < 1024
    cached = sorted(p.name for p in (tmp_path / "cache" / blend.INDEX_DIR).iterdir())
    assert cached and any("BlendedDataset" in name for name in cached)
    again, _ = blend.build(cfg, str(corpus.tokenizer_model), tok.eod_id, tok.vocab_size)
    assert all(np.array_equal(again[i], train[i]) for i in range(0, n, 37))
    assert np.array_equal(train[n + 5], train[5])  # past the end: wraps


def test_a_split_without_documents_is_refused_before_megatron_loops(corpus, data_cache,
                                                                    tmp_path, world_of_one):
    from stable_megatron.data import DataError, blend
    from stable_megatron.data.tokenizer import Tokenizer

    cfg = _cfg(corpus, data_cache, tmp_path, split="99,1,0")
    validate(cfg, 1)
    tok = Tokenizer(corpus.tokenizer_model)
    with pytest.raises(DataError, match=r"val: 19 documents leave none for the valid split"):
        blend.build(cfg, str(corpus.tokenizer_model), tok.eod_id, tok.vocab_size)
