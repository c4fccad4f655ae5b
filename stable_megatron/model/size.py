"""Parameter counts of the GPT of a config: by formula (any TP x PP layout, no torch needed) and by
building the model's blocks on the meta device (shapes only, no memory) to check the formula.

Blocks, in pipeline order: embedding (word, + learned positions, + a norm with
`model.embedding_norm`), `num_layers` transformer layers,
final LayerNorm, output layer (untied; with tied embeddings the last stage holds a copy of the
word embedding when pp > 1). Per layer, with d = hidden, H heads of d_h, f = ffn, t = TP size:

| piece | parameters on one TP rank |
|---|---|
| input norm (not with qkv_norm) | 2d (LayerNorm) or d (RMSNorm); every norm below likewise |
| QKV (column-parallel) | 3 d^2 / t + 3d / t (bias) |
| q, k head norms (any placement but pre_ln); v head norm (qkv_norm) | 2 d_h each, replicated |
| Proj (row-parallel) | d^2 / t + d (bias, replicated) |
| Proj / FC2 output norms (qk_fc_norm) | 2d each, replicated |
| pre-MLP norm | 2d |
| FC1 (column-parallel) | d f / t + f / t; twice that with SwiGLU (gate and up) |
| FC2 (row-parallel) | f d / t + d |
| sigma-reparam | + 1 (gamma) per reparameterised linear, replicated |
| MLRA target in q, k, v (rank r) | H r (d + d_h) / t instead of d^2 / t |
| MLRA target o | H r (d_h + d) / t instead of d^2 / t |
| attention gate (column-parallel, d -> H) | d H / t + H / t (bias) |

The method rows are each method's `layer_params` (stable_megatron/methods/).

Embedding: V_pad d / t (vocab-parallel) + s d (learned positions, replicated); output layer
V_pad d / t; final norm 2d. V_pad is the vocabulary padded to a multiple of
lcm(`vocab_pad_multiple`, t). Without `add_bias_linear` the linear biases are absent.
"""

from __future__ import annotations

from dataclasses import dataclass

from stable_megatron.config import Config, ModelConfig


def norm_width(m: ModelConfig) -> int:
    """Parameters per normalised feature: 2 for LayerNorm (weight, bias), 1 for RMSNorm."""
    return 1 if m.normalization == "rmsnorm" else 2


def layer_params(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer held by one of `tp` tensor-parallel ranks: the plain
    pre-LN layer, plus what each enabled stability method adds (`Method.layer_params`)."""
    from stable_megatron import methods
    from stable_megatron.config import Config

    d, f = m.hidden_size, m.ffn_size
    bias = m.add_bias_linear
    nw = norm_width(m)
    n = nw * d  # input norm
    n += 3 * d * d // tp + (3 * d // tp if bias else 0)  # QKV, column-parallel
    n += d * d // tp + (d if bias else 0)  # Proj, row-parallel
    n += nw * d  # pre-MLP norm
    glu = 2 if m.activation == "swiglu" else 1  # SwiGLU's FC1 holds gate and up
    n += glu * (d * f // tp + (f // tp if bias else 0))  # FC1
    n += f * d // tp + (d if bias else 0)  # FC2
    cfg = Config(model=m)
    return n + sum(method.layer_params(cfg, tp) for method in methods.enabled(cfg))


def embedding_params(m: ModelConfig, tp: int = 1, with_positions: bool = True) -> int:
    """The embedding block; `with_positions=False`: the tied copy serving as the output layer
    (no positions, no embedding norm)."""
    n = m.padded_vocab_size(tp) * m.hidden_size // tp
    if with_positions and m.position_embedding == "learned":
        n += m.seq_length * m.hidden_size
    if with_positions and m.embedding_norm:
        n += norm_width(m) * m.hidden_size
    return n


def head_params(m: ModelConfig, tp: int = 1) -> int:
    """The untied output layer (no bias)."""
    return m.padded_vocab_size(tp) * m.hidden_size // tp


def final_norm_params(m: ModelConfig) -> int:
    return norm_width(m) * m.hidden_size


@dataclass(frozen=True)
class StageParams:
    """One pipeline stage: its layers and the parameters one TP rank of it holds."""

    stage: int
    layers: tuple[int, int]  # first and last transformer layer (1-based, inclusive)
    per_rank: int  # parameters on one tensor-parallel rank of this stage
    embedding: int  # of which the word/position embedding (or tied copy)
    head: int  # of which the output layer + final norm


def total_params(cfg: Config, tp: int = 1) -> int:
    """Distinct parameters of the model (a tied embedding counted once), whole (not per rank),
    with the vocabulary padded as at TP size `tp`."""
    m = cfg.model
    vocab = m.padded_vocab_size(tp)
    n = vocab * m.hidden_size
    if m.position_embedding == "learned":
        n += m.seq_length * m.hidden_size
    if m.embedding_norm:
        n += norm_width(m) * m.hidden_size
    n += m.num_layers * layer_params(m) + final_norm_params(m)
    if not m.tie_embeddings:
        n += vocab * m.hidden_size
    return n


def stage_params(cfg: Config, tp: int, pp: int) -> list[StageParams]:
    """Per pipeline stage, the parameters on each of its TP ranks (layers split evenly, the
    embedding on the first stage, final norm and output layer on the last)."""
    m = cfg.model
    per_stage = m.num_layers // pp
    out = []
    for stage in range(pp):
        n_layers = per_stage * layer_params(m, tp)
        emb = embedding_params(m, tp) if stage == 0 else 0
        head = 0
        if stage == pp - 1:
            head = final_norm_params(m)
            if not m.tie_embeddings:
                head += head_params(m, tp)
            elif pp > 1:  # the last stage's copy of the tied word embedding
                emb += embedding_params(m, tp, with_positions=False)
        first = stage * per_stage + 1
        out.append(StageParams(stage, (first, first + per_stage - 1), n_layers + emb + head,
                               emb, head))
    return out


def flop_params(cfg: Config) -> int:
    """Parameters that take part in matrix multiplies per token: everything but the input
    embedding lookup (a tied embedding counts once, as the output layer)."""
    m = cfg.model
    return (m.num_layers * layer_params(m) + final_norm_params(m)
            + m.padded_vocab_size(1) * m.hidden_size)


# --------------------------------------------------------------------------------------------
# FLOPs and throughput (the training log and `plan` alike)

PEAK_TFLOPS = {"h100": 989.0, "a100": 312.0}  # dense bf16 per GPU


def flops_per_token(cfg: Config) -> float:
    m = cfg.model
    return 6 * flop_params(cfg) + 12 * m.num_layers * m.seq_length * m.hidden_size


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name (`torch.cuda.get_device_name()`); None if unknown."""
    name = device_name.lower()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def throughput(cfg: Config, tokens_per_sec: float, world: int,
               device_name: str = "") -> dict[str, float]:
    """What a training log line reports: model TFLOP/s per device (FLOPs per token above, i.e.
    without recompute) and, for a known GPU, MFU against its dense bf16 peak."""
    tflops = tokens_per_sec * flops_per_token(cfg) / world / 1e12
    out = {"tflops_per_device": tflops}
    peak = peak_tflops(device_name)
    if peak is not None:
        out["mfu"] = tflops / peak
    return out



# --------------------------------------------------------------------------------------------
# The same counts from the real modules, built on the meta device


def meta_block_params(cfg: Config) -> dict[str, int]:
    """Build the model's blocks (TP size 1) on the meta device and count their parameters:
    {"embedding", "layers" (all of them), "layer" (the first), "final_norm", "head"}.

    Needs a tensor-parallel group of size 1 (torch.distributed and megatron-core's parallel
    state initialised, as in a one-process run). Initialisation is skipped: meta tensors have
    no values.
    """
    import torch

    from stable_megatron import compat
    from stable_megatron.model import gpt
    from stable_megatron.model.spec import transformer_config

    if cfg.model.vocab_size is None:
        raise ValueError("model.vocab_size must be set to count parameters")
    compat.apply_cpu_patches()

    def count(module: torch.nn.Module) -> int:
        assert all(p.device.type == "meta" for p in module.parameters())
        return sum(p.numel() for p in module.parameters())

    m = cfg.model
    with torch.device("meta"):
        tcfg = transformer_config(cfg)
        tcfg.perform_initialization = False
        vocab = m.padded_vocab_size(1)
        layers = [count(gpt.TransformerLayerPipe(cfg, tcfg, i, 0, torch.device("cpu")))
                  for i in range(1, m.num_layers + 1)]
        return {
            "embedding": count(gpt.EmbeddingPipe(cfg, tcfg, vocab, 0)),
            "layers": sum(layers),
            "layer": layers[0],
            "final_norm": count(gpt.FinalNormPipe(cfg)),
            "head": 0 if m.tie_embeddings else count(gpt.LMHeadPipe(cfg, tcfg, vocab, 0)),
        }
