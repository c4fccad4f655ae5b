"""The embedding options of issue 14 (docs/methods.md): `model.embedding_norm` (a LayerNorm on
the embedding output), `model.scale_embeddings` (token embeddings times sqrt(hidden)) and
`train.embedding_weight_decay=false` (no weight decay on the embedding tables), each against an
independent computation; their parity at TP2 x PP2 is in tests/distributed/test_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

from stable_megatron.config import config_from_dict, validate

pytestmark = pytest.mark.usefixtures("one_process")  # megatron-core's TP group (of one)

HIDDEN, SEQ, VOCAB = 32, 8, 100


def _cfg(model=None, train=None):
    cfg = config_from_dict({
        "data": {"vocab_size": VOCAB},
        "model": {"num_layers": 1, "hidden_size": HIDDEN, "num_attention_heads": 4,
                  "seq_length": SEQ, "init_std": 0.2, **(model or {})},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, **(train or {})},
    })
    validate(cfg, 1)
    return cfg


def _embedding(cfg, with_positions=True):
    from stable_megatron.model.gpt import EmbeddingPipe
    from stable_megatron.model.spec import transformer_config

    return EmbeddingPipe(cfg, transformer_config(cfg), cfg.model.padded_vocab_size(1), 3,
                         with_positions)


@pytest.mark.parametrize("norm, scale", [(False, False), (True, False), (False, True),
                                         (True, True)])
def test_embedding_output(norm, scale):
    cfg = _cfg({"embedding_norm": norm, "scale_embeddings": scale})
    emb = _embedding(cfg)
    if norm:  # a non-trivial affine part, so that it is used as well
        with torch.no_grad():
            emb.norm.weight.uniform_(0.5, 1.5)
            emb.norm.bias.uniform_(-0.5, 0.5)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out = emb(tokens)  # [s, b, h]
    want = emb.word_embeddings.weight[tokens] * (math.sqrt(HIDDEN) if scale else 1.0)
    want = want + emb.position_embeddings.weight[:SEQ]
    if norm:
        want = torch.nn.functional.layer_norm(want, (HIDDEN,), emb.norm.weight, emb.norm.bias,
                                              cfg.model.layernorm_epsilon)
    torch.testing.assert_close(out, want.transpose(0, 1), rtol=1e-6, atol=1e-6)
    assert (emb.norm is not None) == norm


def test_the_tied_output_copy_has_no_norm():
    """The last stage's tied copy is the output layer only: a norm there would be a parameter
    without a gradient."""
    cfg = _cfg({"embedding_norm": True})
    assert _embedding(cfg).norm is not None
    assert _embedding(cfg, with_positions=False).norm is None


@pytest.mark.parametrize("tie", [True, False])
def test_no_weight_decay_on_the_embedding_tables(tie, one_process):
    from stable_megatron.model.gpt import build_model
    from stable_megatron.train import make_optimizer

    state = one_process
    for decay in (True, False):
        cfg = _cfg({"tie_embeddings": tie}, {"embedding_weight_decay": decay,
                                             "weight_decay": 0.3})
        model = build_model(cfg, state.topology, state.device)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for g in make_optimizer(model, cfg).param_groups
                   for p in g["params"] if g["weight_decay"] == 0.3}
        tables = {n for n in names.values() if "word_embeddings" in n or "position_emb" in n}
        matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
        assert tables and tables <= matrices
        assert decayed == (matrices if decay else matrices - tables)
        # an untied output layer is a linear layer, decayed either way
        assert any("output_layer" in n for n in decayed) == (not tie)


def test_gpt2_export_names_the_options_it_cannot_write():
    from stable_megatron.checkpoint.export import hf_gpt2_blockers

    assert hf_gpt2_blockers(_cfg()) == []
    blockers = hf_gpt2_blockers(_cfg({"embedding_norm": True, "scale_embeddings": True}))
    assert any("model.embedding_norm=true" in b for b in blockers)
    assert any("model.scale_embeddings=true" in b for b in blockers)
