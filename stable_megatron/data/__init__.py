"""Data pipeline: built-in corpus, sentencepiece tokenizer, megatron-core indexed datasets."""


class DataError(ValueError):
    """A problem with input data, a tokenizer model or an on-disk dataset."""


__all__ = ["DataError"]
