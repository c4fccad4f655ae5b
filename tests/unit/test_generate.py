"""`stable-megatron generate`: the loaded model's next-token logits equal the training
engine's on the same tokens, decoding is greedy / seeded sampling over the tokenizer's ids, and
bad input is refused in one line."""

from __future__ import annotations

import pytest
import torch

from stable_megatron.generate import choose
from stable_megatron.train import Trainer
from tests.unit.test_checkpoint import SMALL, TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    """A 3-step run with a checkpoint; its engine's logits on a fixed sequence."""
    from stable_megatron import parallel
    from stable_megatron.config import load_config, validate

    run_dir = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config(TINY, [*SMALL, f"data.cache_dir={data_cache}", f"train.run_dir={run_dir}",
                             "train.steps=3", "checkpoint.interval=3"])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    trainer.run()
    ids = torch.tensor([[5, 17, 300, 2, 999, 41, 7]])
    trainer.engine.module.eval()
    with torch.no_grad():
        expected = trainer.engine.module(ids)[-1, 0, :1024].float().clone()
    parallel.shutdown()
    return run_dir, ids[0].tolist(), expected


def test_loaded_model_has_the_engines_logits(run):
    from stable_megatron import parallel
    from stable_megatron.generate import load

    run_dir, ids, expected = run
    gen = load(str(run_dir))
    try:
        assert gen.tokenizer.vocab_size == 1024
        logits = gen.next_token_logits(ids)
        assert logits.shape == (1024,)  # the tokenizer's ids only, no padding
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        greedy = list(gen.tokens(ids, 4))
        step, chain = list(ids), []
        for _ in range(4):
            token = int(gen.next_token_logits(step).argmax())
            if token == gen.tokenizer.eod_id:
                break
            chain.append(token)
            step.append(token)
        assert greedy == chain
        sampled = list(gen.tokens(ids, 6, temperature=1.0, seed=3))
        assert sampled == list(gen.tokens(ids, 6, temperature=1.0, seed=3))
        assert list(gen.tokens(ids, 4, temperature=1.0, top_k=1)) == greedy
    finally:
        parallel.shutdown()


def test_choose_greedy_top_k_and_temperature():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    rng = torch.Generator().manual_seed(0)
    assert choose(logits, 0.0, None, rng) == 1
    draws = {choose(logits, 1.0, 2, rng) for _ in range(200)}
    assert draws == {1, 3}  # only the two largest
    cold = [choose(logits, 0.05, None, rng) for _ in range(50)]
    assert set(cold) == {1}


def test_cli_prints_the_prompt_and_its_continuation(run, capsys):
    from stable_megatron.cli import main

    run_dir, _, _ = run
    assert main(["generate", str(run_dir), "--prompt", "The Congress", "--max-new-tokens",
                 "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The Congress") and out.endswith("\n")
    from stable_megatron import parallel
    from stable_megatron.generate import load

    gen = load(str(run_dir))  # the printed text is the decoded prompt + continuation, with the
    try:                      # continuation's leading space (decoding it alone would drop it)
        ids = gen.tokenizer.encode("The Congress")
        assert out == gen.tokenizer.decode(ids + list(gen.tokens(ids, 5))) + "\n"
    finally:
        parallel.shutdown()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from stable_megatron.generate import main

    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nowhere" in err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--top-k", "0"])
