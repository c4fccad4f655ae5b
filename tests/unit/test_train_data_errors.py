"""Bad data reaching `stable-megatron train` stops it before any process group starts, with
one `error:` line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from stable_megatron import train as train_module

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> dict[str, Path]:
    from stable_megatron.data.dataset import write_token_documents
    from stable_megatron.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("user-data")
    text = root / "text.txt"
    text.write_text("\n".join(f"line {i} of some plain english words here" for i in range(400)))
    tokenizer = train_tokenizer([text], root / "tok", vocab_size=300)
    docs = [[(i * 7 + j) % tokenizer.vocab_size for j in range(500)] for i in range(4)]
    write_token_documents(docs, root / "train", tokenizer.vocab_size)
    return {"root": root, "tokenizer": root / "tok.model", "train": root / "train"}


def run_main(capsys, overrides: list[str]) -> tuple[int, list[str]]:
    code = train_module.main([TINY, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def indexed(data: dict[str, Path], prefix: Path) -> list[str]:
    return ["data.source=indexed", f"data.train_prefix={prefix}",
            f"data.tokenizer_model={data['tokenizer']}", "train.eval_interval=0"]


def test_truncated_bin_is_named(user_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "build_engine", lambda *a: pytest.fail("got past data"))
    prefix = tmp_path / "cut"
    for suffix in (".bin", ".idx"):
        source = user_data["train"].with_suffix(suffix)
        (tmp_path / f"cut{suffix}").write_bytes(source.read_bytes())
    bin_path = prefix.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:100])
    code, err = run_main(capsys, indexed(user_data, prefix))
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    assert "cut.bin" in err[0]


def test_too_little_data_for_one_sequence(user_data, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "build_engine", lambda *a: pytest.fail("got past data"))
    code, err = run_main(capsys, [*indexed(user_data, user_data["train"]),
                                  "model.seq_length=4096"])
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err


def test_vocab_smaller_than_the_tokenizer(user_data, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "build_engine", lambda *a: pytest.fail("got past data"))
    code, err = run_main(capsys, [*indexed(user_data, user_data["train"]), "model.vocab_size=10"])
    assert code == 2 and len(err) == 1
    assert "model.vocab_size=10" in err[0] and "tokenizer" in err[0]
