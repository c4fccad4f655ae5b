"""Token Embedding Variability (Chung et al. 2024; methods.md section 1).

`TEV_i` is the population standard deviation of the d entries of embedding row i; the logged
values are the mean (`<key>/mean`) and the population standard deviation (`<key>/std`) of TEV_i
over the real vocabulary: the rows a vocabulary-parallel shard holds beyond `vocab_size` are
padding and are left out, so the values do not depend on the padding, hence on the TP size.
"""

from __future__ import annotations

import torch

from stable_megatron.metrics.reduce import Contributions


def row_std(rows: torch.Tensor) -> torch.Tensor:
    """TEV_i of each row, in float64."""
    return rows.detach().double().std(dim=1, unbiased=False)


def add_tev(
    contrib: Contributions,
    key: str,
    weight: torch.Tensor,
    first_row: int,
    vocab_size: int,
    owner: bool,
) -> None:
    """Contribute the count, sum and sum of squares of TEV_i over the real rows of `weight`, a
    shard holding global rows `first_row ..`; `owner` False (a data-parallel replica) adds
    zeros. Shards of one matrix over TP ranks hold disjoint rows, so their parts add up."""
    real = max(0, min(weight.size(0), vocab_size - first_row))
    tev = row_std(weight[:real]) if owner and real else weight.new_zeros(0, dtype=torch.float64)
    contrib.moments(key, tev.numel(), tev.sum(), tev.square().sum())
