"""Hugging Face exports used with no code of ours: a GPT-2 (baseline) and a Llama-style run are
exported with their tokenizer, loaded by `transformers` from the directory alone, and give
our tokenizer's ids and our model's logits (1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stable_megatron.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=32", "data.vocab_size=1024", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=1", "train.eval_interval=0",
    "metrics.interval=0", "logging.tensorboard=false", "logging.progress=false",
    "train.steps=3", "checkpoint.interval=3", "train.lr=1e-2",
]
LLAMA = ["model.normalization=rmsnorm", "model.activation=swiglu", "model.ffn_hidden_size=96",
         "model.position_embedding=rope", "model.tie_embeddings=false"]
TEXT = "The state of the Union is strong.\n\nWe the People, 1787 -- ünïcödé  twice"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory, data_cache):
    """A 3-step run (Llama-style with biases on, to cover them), its export, and our engine's
    logits on the exported tokenizer's ids of TEXT."""
    from stable_megatron import parallel
    from stable_megatron.checkpoint import export
    from stable_megatron.config import load_config, validate
    from stable_megatron.data.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp(request.param)
    extra = LLAMA if request.param == "llama" else []
    cfg = load_config(TINY, [*SMALL, *extra, f"data.cache_dir={data_cache}",
                             f"train.run_dir={tmp / 'run'}"])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    trainer.run()
    ours = Tokenizer(export.tokenizer_model_of(cfg))
    ids = ours.encode(TEXT)[:32]
    trainer.engine.module.eval()
    with torch.no_grad():
        logits = trainer.engine.module(torch.tensor([ids]))[:, 0].float().clone()  # [s, V]
    parallel.shutdown()
    ckpt = export.open_checkpoint(tmp / "run")
    out = (export.export_hf_llama if request.param == "llama" else export.export_hf_gpt2)(
        ckpt, tmp / "hf")
    return request.param, out, ours, ids, logits


def test_transformers_loads_tokenizer_and_model_from_the_directory_alone(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, out, ours, ids, logits = exported
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TEXT)["input_ids"] == ours.encode(TEXT)  # no BOS/EOS added, the same pieces
    assert tok.decode(ours.encode(TEXT)) == ours.decode(ours.encode(TEXT)) == TEXT
    assert tok.eos_token_id == ours.eod_id
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == kind
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(hf, logits, rtol=1e-5, atol=1e-5)


def test_llama_export_refuses_other_models_naming_the_fields(tmp_path):
    from stable_megatron.checkpoint.export import hf_llama_blockers
    from stable_megatron.config import config_from_dict

    blockers = " ".join(hf_llama_blockers(config_from_dict({"model": {"softmax_cap": 5.0}})))
    for field in ("model.normalization=layernorm", "model.activation=gelu",
                  "model.position_embedding=learned", "model.softmax_cap=5.0"):
        assert field in blockers
    llama = {"normalization": "rmsnorm", "activation": "swiglu", "position_embedding": "rope"}
    assert hf_llama_blockers(config_from_dict({"model": llama})) == []
