from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The built-in corpus at a 1024 vocabulary, prepared once for the session."""
    from stable_megatron.data.dataset import prepare_builtin_data

    cache = tmp_path_factory.mktemp("data-cache")
    prepare_builtin_data(cache, vocab_size=1024)
    return cache
