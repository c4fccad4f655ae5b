"""The batches: where a run's data is (the built-in corpus, prepared and cached, or the user's,
checked), the micro-batches each data-parallel rank trains on in a step, and evaluation over
the validation set. The loop that uses them is `stable_megatron.train`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from stable_megatron.config import Config
from stable_megatron.data import DataError


@dataclass
class DataSources:
    train_prefix: str | None  # None: data.source=blended (data/blend.py)
    val_prefix: str | None
    tokenizer_model: str
    vocab_size: int


def resolve_data(cfg: Config) -> DataSources:
    """Prepare (built-in corpus, cached) or check (user data) the data of a validated config."""
    from stable_megatron.data.dataset import prepare_builtin_data
    from stable_megatron.data.tokenizer import Tokenizer

    d = cfg.data
    if d.source == "builtin":
        paths = prepare_builtin_data(d.cache_dir, vocab_size=d.vocab_size)
        sources = DataSources(
            str(paths.train_prefix), str(paths.val_prefix), str(paths.tokenizer_model),
            paths.vocab_size,
        )
    elif d.source == "blended":
        vocab = Tokenizer(d.tokenizer_model).vocab_size
        sources = DataSources(None, None, d.tokenizer_model, vocab)
    else:
        vocab = Tokenizer(d.tokenizer_model).vocab_size
        sources = DataSources(d.train_prefix, d.val_prefix, d.tokenizer_model, vocab)
    if sources.vocab_size != cfg.tokenizer_vocab_size:
        raise DataError(
            f"{sources.tokenizer_model}: {sources.vocab_size} tokens, but the validated config "
            f"says data.vocab_size={cfg.tokenizer_vocab_size}"
        )
    return sources


def micro_batches(
    dataset, first_sample: int, cfg: Config, layout, device: torch.device, count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The `count` micro-batches this data-parallel rank trains on in one step.

    Global sample `first_sample + m * (mbs * dp) + dp_rank * mbs + j` is row j of micro-batch m,
    so the global batch is the same set of samples at every data-parallel size."""
    mbs = cfg.train.micro_batch_size
    for m in range(count):
        start = first_sample + m * mbs * layout.dp + layout.dp_rank * mbs
        rows = torch.from_numpy(np.stack([dataset[start + j] for j in range(mbs)])).to(device)
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def evaluate(engine, dataset, cfg: Config, layout, device) -> float:
    accum = engine.gradient_accumulation_steps()
    losses = []
    for i in range(cfg.train.eval_iters):
        first = i * cfg.train.global_batch_size
        batches = micro_batches(dataset, first, cfg, layout, device, accum)
        losses.append(engine.eval_batch(batches).item())
    return sum(losses) / len(losses)
