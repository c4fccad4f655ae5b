"""Convert .jsonl / .txt files into megatron-core indexed datasets (.bin + .idx).

    stable-megatron preprocess --input data/ more.jsonl --output-prefix out/corpus \
        --vocab-size 8192 --val-fraction 0.05

Each .jsonl line (key --json-key, default "text") and each .txt file is one document; every
document is followed by the tokenizer's EOD token. With --val-fraction the documents are split
deterministically into <prefix>_train and <prefix>_val. --vocab-size trains a new BPE tokenizer
on the training documents and saves it as <prefix>.model; --tokenizer-model reuses one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from stable_megatron.data import DataError
from stable_megatron.data.corpus import find_input_files, read_documents, split_by_key
from stable_megatron.data.dataset import build_indexed_dataset
from stable_megatron.data.tokenizer import Tokenizer, train_tokenizer

EXIT_ERROR = 2
Document = tuple[str, str]  # (stable key "file:index", text)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as a single line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None, prog: str = "stable-megatron preprocess"
               ) -> argparse.Namespace:
    parser = OneLineParser(
        prog=prog,
        description="Tokenize .jsonl/.txt files into megatron-core .bin/.idx datasets.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="files and/or directories")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer-model", type=Path, help="existing sentencepiece model")
    source.add_argument("--vocab-size", type=int, help="train a new BPE tokenizer of this size")
    parser.add_argument("--val-fraction", type=float, help="write <prefix>_train and _val")
    parser.add_argument("--json-key", default="text", help="text field of .jsonl records")
    return parser.parse_args(argv)


def load_documents(inputs: Sequence[str], json_key: str) -> list[Document]:
    """Read and validate every input up front, so bad data fails before any slow work."""
    documents: list[Document] = []
    for path in find_input_files(inputs):
        for index, text in enumerate(read_documents(path, json_key)):
            if text.strip():
                documents.append((f"{path.name}:{index}", text))
    if not documents:
        raise DataError("the input files contain no non-blank documents")
    return documents


def get_tokenizer(args: argparse.Namespace, train_docs: list[Document]) -> Tokenizer:
    if args.tokenizer_model is not None:
        return Tokenizer(args.tokenizer_model)
    if args.vocab_size is None or args.vocab_size < 300:
        raise DataError("--vocab-size must be at least 300 (256 byte pieces + merges)")
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "train.txt"
        text_file.write_text("\n".join(text for _, text in train_docs), encoding="utf-8")
        return train_tokenizer([text_file], args.output_prefix, args.vocab_size)


def run(args: argparse.Namespace) -> None:
    documents = load_documents(args.input, args.json_key)
    if args.val_fraction is None:
        splits = {args.output_prefix: documents}
    else:
        train, val = split_by_key(documents, lambda doc: doc[0], args.val_fraction)
        splits = {f"{args.output_prefix}_train": train, f"{args.output_prefix}_val": val}
    tokenizer = get_tokenizer(args, next(iter(splits.values())))
    if args.tokenizer_model is None:
        print(f"wrote tokenizer {args.output_prefix}.model (vocab {tokenizer.vocab_size})")
    for prefix, docs in splits.items():
        stats = build_indexed_dataset((text for _, text in docs), tokenizer, prefix)
        print(
            f"wrote {prefix}.bin/.idx: {stats.num_documents} documents, {stats.num_tokens} tokens"
        )


def main(argv: Sequence[str] | None = None, prog: str = "stable-megatron preprocess"
         ) -> int:
    """`prog`: the name in usage and error lines (tools/preprocess_data.py passes its own)."""
    args = parse_args(argv, prog)
    try:
        run(args)
    except (DataError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
