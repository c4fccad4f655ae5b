"""The GPT model as a DeepSpeed `PipelineModule` over megatron-core tensor-parallel layers.

The model is a flat list of stages' building blocks, `embedding -> layer_1 .. layer_L ->
final_norm -> lm_head`, which DeepSpeed splits evenly by transformer layer over pipeline stages
(one stage when parallel.pp=1, trained there by DeepSpeed's plain engine so that ZeRO stages
2-3 are open: `ds_adapter.DataParallelEngine`). Tensors between blocks are the hidden states
`[seq, batch, hidden]` only: attention is causal by construction, so no mask travels between
stages.

Every block seeds the CPU generator with `seed + its index` before creating its weights, and
megatron-core initialises each weight whole before splitting it over tensor-parallel ranks:
the same config gives the same model at every TP x PP x DP layout.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import tensor_parallel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from stable_megatron.config import Config
from stable_megatron.model import recompute
from stable_megatron.model.layers import norm
from stable_megatron.model.loss import LMLoss, cross_entropy
from stable_megatron.model.spec import layer_spec, transformer_config


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class PositionEmbedding(nn.Embedding):
    """Learned positions, `init_method` applied in the constructor: a module's own constructor
    is where ZeRO-3's zero.Init still holds its weight whole (it splits the weight when the
    constructor returns; a parent initialising it afterwards would touch an empty placeholder)."""

    def __init__(self, positions: int, hidden: int, init_method) -> None:
        super().__init__(positions, hidden)
        init_method(self.weight)


class EmbeddingPipe(nn.Module):
    """Vocab-parallel word embedding (scaled by sqrt(h) with `model.scale_embeddings`, + learned
    positions, + a LayerNorm with `model.embedding_norm`). tokens [b, s] -> hidden [s, b, h].
    `with_positions=False` builds the tied copy that serves as the output layer only."""

    def __init__(
        self,
        cfg: Config,
        tcfg: TransformerConfig,
        padded_vocab: int,
        seed: int,
        with_positions: bool = True,
    ) -> None:
        super().__init__()
        _seeded(seed)
        m = cfg.model
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, m.hidden_size, init_method=tcfg.init_method, config=tcfg
        )
        self.position_embeddings = None
        if m.position_embedding == "learned" and with_positions:
            self.position_embeddings = PositionEmbedding(m.seq_length, m.hidden_size,
                                                         tcfg.init_method)
        # input side only: the tied copy on the last stage serves as the output layer
        self.scale = m.hidden_size ** 0.5 if m.scale_embeddings else None
        self.norm = None
        if m.embedding_norm and with_positions:
            self.norm = norm(m.normalization, m.hidden_size, m.layernorm_epsilon)
        self.dropout = nn.Dropout(m.hidden_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(tokens)
        if self.scale is not None:
            hidden = hidden * self.scale
        if self.position_embeddings is not None:
            positions = torch.arange(tokens.size(1), device=tokens.device)
            hidden = hidden + self.position_embeddings(positions)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.dropout(hidden.transpose(0, 1).contiguous())

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output layer: vocab-parallel logits [s, b, V / tp]."""
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return torch.nn.functional.linear(hidden, self.word_embeddings.weight)


def _tied_head(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return module.lm_head(hidden)


def rope_angles(seq: int, dim: int, base: float, device: torch.device) -> torch.Tensor:
    """Rotary angles [seq, 1, 1, dim] in the (non-interleaved) layout megatron-core's
    `apply_rotary_pos_emb` takes. Computed here rather than with megatron-core's
    `RotaryEmbedding`, which moves its buffer to `torch.cuda.current_device()`."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


class TransformerLayerPipe(nn.Module):
    """One megatron-core `TransformerLayer` (built from our spec), with rotary positions."""

    def __init__(
        self,
        cfg: Config,
        tcfg: TransformerConfig,
        layer_number: int,
        seed: int,
        device: torch.device,
    ) -> None:
        super().__init__()
        _seeded(seed)
        spec = layer_spec(cfg, device, layer_number)
        self.layer = build_module(spec, config=tcfg, layer_number=layer_number)
        self.rope_base = cfg.model.rope_base if cfg.model.position_embedding == "rope" else None
        self.head_dim = cfg.model.head_dim
        self.full_recompute = cfg.train.recompute == "full"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rope = None
        if self.rope_base is not None:
            rope = rope_angles(hidden.size(0), self.head_dim, self.rope_base, hidden.device)
        if self.full_recompute and recompute.active(self):
            # train.recompute=full: only `hidden` (and `rope`) kept; see model/recompute.py
            return recompute.checkpointed(self._layer, hidden, rope, observed=self.layer)
        return self._layer(hidden, rope)

    def _layer(self, hidden: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        out, _ = self.layer(hidden, attention_mask=None, rotary_pos_emb=rope)
        return out


class FinalNormPipe(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.norm = norm(m.normalization, m.hidden_size, m.layernorm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class LMHeadPipe(nn.Module):
    """Untied output layer: column-parallel, logits stay split over the vocabulary."""

    def __init__(self, cfg: Config, tcfg: TransformerConfig, padded_vocab: int, seed: int) -> None:
        super().__init__()
        _seeded(seed)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            cfg.model.hidden_size,
            padded_vocab,
            config=tcfg,
            init_method=tcfg.init_method,
            bias=False,
            gather_output=False,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return logits


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy of vocab-parallel logits [s, b, V/tp] against labels [b, s]
    (the model's loss without z-loss; `model.loss.LMLoss` is the training loss function)."""
    return cross_entropy(logits.float(), labels)


def layer_specs(cfg: Config, device: torch.device) -> list[LayerSpec]:
    """The DeepSpeed layer specs of the model, in order (the `PipelineModule`'s global block
    indices); nothing is built. `build_model` lays these out; the checkpoint code builds single
    blocks from them on the meta device."""
    tcfg = transformer_config(cfg)
    m, seed = cfg.model, cfg.train.seed
    padded_vocab = m.padded_vocab_size(cfg.parallel.tp)
    embedding_args = (EmbeddingPipe, cfg, tcfg, padded_vocab, seed)
    if m.tie_embeddings:
        first = TiedLayerSpec("embed", *embedding_args, tied_weight_attr="word_embeddings.weight")
        # On the last pipeline stage the tied copy serves as the output layer only.
        last = TiedLayerSpec(
            "embed",
            *embedding_args,
            False,
            forward_fn=_tied_head,
            tied_weight_attr="word_embeddings.weight",
        )
    else:
        first = LayerSpec(*embedding_args)
        last = LayerSpec(LMHeadPipe, cfg, tcfg, padded_vocab, seed + m.num_layers + 1)
    layers = [
        LayerSpec(TransformerLayerPipe, cfg, tcfg, i, seed + i, device)
        for i in range(1, m.num_layers + 1)
    ]
    return [first, *layers, LayerSpec(FinalNormPipe, cfg), last]


def build_model(cfg: Config, topology, device: torch.device) -> PipelineModule:
    """The GPT PipelineModule for `cfg` (with model.vocab_size resolved) on `topology`."""
    return PipelineModule(
        layers=layer_specs(cfg, device),
        loss_fn=LMLoss.from_config(cfg),
        topology=topology,
        partition_method=cfg.parallel.partition_method,
        activation_checkpoint_interval=0,
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
