"""The run's sentencepiece tokenizer as a Hugging Face fast tokenizer (`tokenizer.json`), so that
`AutoTokenizer.from_pretrained(export_dir)` encodes and decodes text exactly as
`data.tokenizer.Tokenizer` does, with no code of ours.

Our tokenizer encodes a text line by line (sentencepiece BPE with identity normalisation, byte
fallback and its dummy prefix: a "▁" before every non-empty line) and joins the lines with the
newline byte piece `<0x0A>`. The `tokenizer.json` written here says the same in the
`tokenizers` library's terms:
- normalizer: "▁" at the start of every non-empty line, then every space as "▁";
- pre-tokenizer: every newline split off on its own (so no merge crosses a line);
- model: BPE over the sentencepiece vocabulary (ids unchanged) with byte fallback; its merges
  are every split of a vocabulary piece into two vocabulary pieces, in the order of the merged
  piece's id (sentencepiece's BPE ranks pieces by when they were merged) and, within a piece,
  by the length of the left part;
- decoder: "▁" back to spaces, byte pieces back to bytes, then the dummy prefix's space
  removed at the start of every line.
Nothing is added around a text: no BOS/EOS (as our data pipeline, which ends documents with
the EOD id itself). Written without the `tokenizers` package (plain JSON); the tests load it
with `transformers` and compare ids and text with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

DUMMY = "\u2581"  # sentencepiece's whitespace symbol
_SPECIAL = {"<unk>": "unk_token", "<s>": "bos_token", "</s>": "eos_token"}


def _merges(vocab: dict[str, int]) -> list[list[str]]:
    ranked = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((rank, cut, left, right))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [[left, right] for _, _, left, right in ranked]


def tokenizer_json(model_file: str | Path) -> dict:
    """The `tokenizers` JSON of the sentencepiece model `model_file` (see the module docstring)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True} for i in special
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": "(?m)^(?=[^\\n])"}, "content": DUMMY},
            {"type": "Replace", "pattern": {"String": " "}, "content": DUMMY},
        ]},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\n"},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": DUMMY}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"Regex": "(?m)^ "}, "content": ""},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
            "merges": _merges(vocab),
        },
    }


def write_hf_tokenizer(model_file: str | Path, out_dir: str | Path, max_length: int
                       ) -> dict[str, int | None]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` in `out_dir`;
    returns the BOS and EOS ids (`bos_token_id`, `eos_token_id`, for the model's config)."""
    out = Path(out_dir)
    data = tokenizer_json(model_file)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n")
    present = {t["content"] for t in data["added_tokens"]}
    special = {key: piece for piece, key in _SPECIAL.items() if piece in present}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces":
              False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    vocab = data["model"]["vocab"]
    return {"bos_token_id": vocab.get("<s>"), "eos_token_id": vocab.get("</s>")}
