"""Several corpora in set proportions through megatron-core's own datasets (`data.source=blended`).

`data.blend` lists indexed-dataset prefixes in Megatron's convention: either weights and
prefixes alternating (`[0.25, data/a, 0.75, data/b]`: weights are normalised) or prefixes only
(`[data/a, data/b]`: weighted by their sizes). megatron-core's `BlendedMegatronDatasetBuilder`
then builds a `GPTDataset` per prefix (documents shuffled per epoch, samples of `seq_length +
1` tokens across document boundaries) and a `BlendedDataset` drawing from them in the
weights' proportions, and caches every index under `<data.cache_dir>/megatron_indices` (built
once by global rank 0, read by every rank after a barrier; keyed by megatron-core on the
prefixes, weights, split, seed and sizes).

Validation: a split of each corpus (`data.split`, Megatron's "train,valid,test" weights over
each corpus's documents, default `99,1,0`), or separate corpora in `data.val_blend` (same
syntax; then the training corpora are used whole).

Samples are addressed by their global index, as the built-in windows are, so a resume at any
layout continues with exactly the batches an uninterrupted run would have seen
(`train.micro_batches`). The training dataset holds `train.steps x global_batch_size`
samples; an index beyond it (a rollback that skips data near the end of a run) wraps around.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stable_megatron.data import DataError

INDEX_DIR = "megatron_indices"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Blend:
    prefixes: list[str]
    weights: list[float] | None  # None: by size

    def megatron(self) -> tuple[list[str], list[float] | None]:
        return list(self.prefixes), None if self.weights is None else list(self.weights)


def parse_blend(name: str, items: list[str]) -> Blend:
    """Megatron's blend list: `[w1, p1, w2, p2, ...]` or `[p1, p2, ...]`. Raises `ValueError`
    naming `name` for an empty list, a weight that is not a positive number, or a mix."""
    if not items:
        raise ValueError(f"{name} is empty: list dataset prefixes, optionally each after its "
                         f"weight ([0.3, data/a, 0.7, data/b])")

    def number(text: str) -> float | None:
        try:
            return float(text)
        except (TypeError, ValueError):
            return None

    numbers = [number(x) for x in items]
    if all(n is None for n in numbers):
        return Blend([str(x) for x in items], None)
    if len(items) % 2 or any(n is None for n in numbers[0::2]) or any(
            n is not None for n in numbers[1::2]):
        raise ValueError(f"{name}={items}: expected weights and prefixes alternating "
                         f"([0.3, data/a, 0.7, data/b]) or prefixes only ([data/a, data/b])")
    weights = numbers[0::2]
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"{name}: weight {bad[0]} is not a positive number")
    return Blend([str(x) for x in items[1::2]], weights)


def parse_split(text: str) -> list[float]:
    """Megatron's split string "99,1,0" -> three non-negative weights, the first positive."""
    try:
        parts = [float(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(not math.isfinite(p) or p < 0 for p in parts) or parts[0] <= 0:
        raise ValueError(f"data.split={text!r}: expected three non-negative weights "
                         f"train,valid,test with train > 0, e.g. 99,1,0")
    return parts


def missing_files(prefixes: list[str]) -> list[str]:
    return [f"{p}{suffix}" for p in prefixes for suffix in (".bin", ".idx")
            if not Path(f"{p}{suffix}").is_file()]


def document_counts(prefix: str) -> int:
    from stable_megatron.data.dataset import indexed_dataset_module

    module = indexed_dataset_module()
    return len(module.IndexedDataset(prefix).document_indices) - 1


def check_splits(blend: Blend, split: list[float] | None) -> None:
    """megatron-core builds every split with a positive weight for every corpus, and loops
    forever on one that gets no document: refuse that first, naming the corpus and split."""
    if split is None:
        return
    total = sum(split)
    for prefix in blend.prefixes:
        docs = document_counts(prefix)
        # megatron-core's book-ends: round(cumulative fraction x documents)
        ends = [0] + [round(sum(split[:i + 1]) / total * docs) for i in range(3)]
        for i, name in enumerate(SPLITS):
            if split[i] > 0 and ends[i + 1] - ends[i] < 1:
                raise DataError(
                    f"{prefix}: {docs} documents leave none for the {name} split of "
                    f"data.split={','.join(f'{s:g}' for s in split)}; give that split more "
                    f"weight, or separate validation data in data.val_blend"
                )


class _Tokenizer:
    """What megatron-core's GPTDataset reads of a tokenizer: the end-of-document id, a pad id
    (-1: no token is padding; our loss does not use its loss mask), the vocabulary size and an
    identity for the cache keys."""

    def __init__(self, eod: int, model_file: str, vocab_size: int) -> None:
        self.eod, self.pad, self.bos, self.vocab_size = eod, -1, None, vocab_size
        self.unique_identifiers = {"class": "stable_megatron", "model": str(model_file)}


class Windows:
    """A megatron-core dataset as `seq_length + 1`-token windows (`tokens` then the last label),
    int64, addressed by global sample index (wrapping past the end). `source(i)`: the corpus
    a blended sample came from."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        sample = self.dataset[int(index) % len(self.dataset)]
        tokens, labels = np.asarray(sample["tokens"]), np.asarray(sample["labels"])
        return np.concatenate([tokens, labels[-1:]]).astype(np.int64)

    def source(self, index: int) -> int:
        return int(self.dataset.dataset_index[int(index) % len(self.dataset)])


def build(cfg, tokenizer_model: str, eod: int, vocab_size: int
          ) -> tuple[Windows, Windows | None]:
    """The training and validation datasets of `cfg` (data.source=blended). Call after
    torch.distributed is initialised, on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.train
    blend = parse_blend("data.blend", d.blend)
    val_blend = parse_blend("data.val_blend", d.val_blend) if d.val_blend else None
    evaluating = bool(t.eval_interval)
    split = None if val_blend is not None else parse_split(d.split)
    check_splits(blend, split)  # on every rank: none may be left waiting at the build's barrier
    sizes = [t.steps * t.global_batch_size,
             t.eval_iters * t.global_batch_size if evaluating else 0, 0]
    common = dict(
        random_seed=t.seed, sequence_length=cfg.model.seq_length,
        path_to_cache=str(Path(d.cache_dir) / INDEX_DIR),
        tokenizer=_Tokenizer(eod, tokenizer_model, vocab_size), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    if val_blend is None:
        config = GPTDatasetConfig(blend=blend.megatron(), split=",".join(map(str, split)),
                                  **common)
    else:
        config = GPTDatasetConfig(
            blend_per_split=[blend.megatron(), val_blend.megatron() if evaluating else None,
                             None], **common)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, config).build()
    return Windows(train), (Windows(valid) if evaluating and valid is not None else None)
