"""SentencePiece BPE tokenizer: training and a small lossless encode/decode wrapper."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from stable_megatron.data import DataError

NEWLINE_PIECE = "<0x0A>"  # the byte-fallback piece for "\n"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """A sentencepiece model. Text is encoded line by line; lines are joined by the newline
    byte piece, so decode(encode(text)) == text for any text (identity normalisation)."""

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise DataError(f"{self.model_file}: tokenizer model not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{self.model_file}: not a sentencepiece model ({exc})") from None
        self._newline_id = self._sp.piece_to_id(NEWLINE_PIECE)
        if self._sp.eos_id() < 0 or self._newline_id == self._sp.unk_id():
            raise DataError(f"{self.model_file}: model needs an eos id and byte_fallback=True")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no EOD appended)."""
        ids: list[int] = []
        for i, line_ids in enumerate(self._sp.encode(text.split("\n"), out_type=int)):
            if i:
                ids.append(self._newline_id)
            ids.extend(line_ids)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; EOD and other control tokens decode to nothing."""
        lines: list[list[int]] = [[]]
        for token in ids:
            if int(token) == self._newline_id:
                lines.append([])
            else:
                lines[-1].append(int(token))
        return "\n".join(self._sp.decode(lines))


def train_tokenizer(
    text_files: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int = 8192,
    num_threads: int = 2,
) -> Tokenizer:
    """Train a deterministic byte-fallback BPE model; writes <model_prefix>.model/.vocab."""
    if not text_files:
        raise DataError("no text files to train the tokenizer on")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(os.devnull, "w") as quiet:
            spm.SentencePieceTrainer.train(
                logstream=quiet,
                minloglevel=2,
                **_trainer_options(text_files, model_prefix, vocab_size, num_threads),
            )
    except RuntimeError as exc:
        reason = str(exc).rsplit("] ", 1)[-1]  # drop sentencepiece's source location
        raise DataError(f"tokenizer training failed: {reason}") from None
    return Tokenizer(f"{model_prefix}.model")


def _trainer_options(
    text_files: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    num_threads: int,
) -> dict[str, object]:
    return {
        "input": [str(f) for f in text_files],
        "model_prefix": str(model_prefix),
        "vocab_size": vocab_size,
        "model_type": "bpe",
        "byte_fallback": True,
        "max_sentence_length": 16384,
        "input_sentence_size": 0,  # use every line: no sampling, so training is deterministic
        "shuffle_input_sentence": False,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "split_digits": True,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": -1,
        "num_threads": num_threads,
    }
