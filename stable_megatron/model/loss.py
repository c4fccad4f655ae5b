"""The language-model loss over vocabulary-parallel logits, with the optional z-loss.

`LMLoss(z_loss)` is the pipeline module's `loss_fn`: the mean token cross entropy of the logits
[s, b, V / tp] (megatron-core's `vocab_parallel_cross_entropy`) plus, when `z_loss` > 0 and
gradients are being computed (training, not `eval_batch`),
`z_loss * mean over tokens of logsumexp(logits)^2` (PaLM; Wortsman et al. 2023,
arXiv 2309.14322): it pulls the softmax normaliser towards 1, which keeps the output logits
from drifting upwards. Validation losses stay pure cross entropy, so a sweep compares methods
on the same quantity.

The log-sum-exp is taken over the whole (padded) vocabulary without gathering the logits: each
tensor-parallel rank's row maxima and sums of exponentials are all-reduced (`VocabParallelLSE`),
and the backward needs no communication (each rank's share of the gradient is the softmax over
its own columns). The padded columns take part, as they do in the cross entropy.

It also keeps, for the step's log record, the z-loss term of each micro-batch (`take_z_loss`),
and, while a capture is on (`start_capture`, the stability metrics on their steps), the
largest and the summed output logits over the tokenizer's vocabulary (`take_logit_stats`):
the output-logit divergence signal. These are this rank's parts; the metrics reduce them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from stable_megatron import parallel


class VocabParallelLSE(torch.autograd.Function):
    """logsumexp over the last dimension of logits split over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        group = parallel.tp_group()
        row_max = logits.detach().amax(dim=-1)
        parallel.all_reduce_(row_max, group=group, op=dist.ReduceOp.MAX)
        sum_exp = (logits - row_max.unsqueeze(-1)).exp().sum(dim=-1)
        parallel.all_reduce_(sum_exp, group=group)
        lse = row_max + sum_exp.log()
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        logits, lse = ctx.saved_tensors
        # d lse / d logit_j = softmax_j, of which this rank holds its own columns
        return (logits - lse.unsqueeze(-1)).exp() * grad.unsqueeze(-1)


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return VocabParallelLSE.apply(logits)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy of vocab-parallel logits [s, b, V/tp] against labels [b, s].
    megatron-core's kernel overwrites `logits` with the softmax (its saved state)."""
    losses = tensor_parallel.vocab_parallel_cross_entropy(
        logits, labels.transpose(0, 1).contiguous()
    )
    return losses.mean()


class LMLoss:
    """The pipeline module's loss function (see the module docstring)."""

    @classmethod
    def from_config(cls, cfg) -> LMLoss:
        """The loss of `cfg`'s model (validated: the tokenizer's vocabulary resolved)."""
        return cls(cfg.model.z_loss, cfg.tokenizer_vocab_size)

    def __init__(self, z_loss: float = 0.0, vocab: int | None = None) -> None:
        self.z_loss = float(z_loss)
        self.vocab = vocab  # the tokenizer's ids: the columns the logit statistics cover
        self._z_terms: list[torch.Tensor] = []
        self._capture = False
        self._logit_max: torch.Tensor | None = None
        self._logit_sum: torch.Tensor | None = None
        self._logit_count = 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self._capture:
            self._observe(logits.detach())
        if not (self.z_loss > 0 and torch.is_grad_enabled()):
            return cross_entropy(logits, labels)
        term = self.z_loss * vocab_parallel_logsumexp(logits).square().mean()
        self._z_terms.append(term.detach())
        # megatron-core's cross entropy overwrites its input with the softmax, and the
        # logsumexp keeps the logits for its backward: with z-loss on, one copy of the logits
        return cross_entropy(logits.clone(), labels) + term

    def take_z_loss(self) -> list[torch.Tensor]:
        """The z-loss terms of the micro-batches since the last call (empty when off)."""
        terms, self._z_terms = self._z_terms, []
        return terms

    # -- output-logit statistics, on metric steps ---------------------------------------------

    def start_capture(self) -> None:
        self._capture = True
        self._logit_max, self._logit_sum, self._logit_count = None, None, 0

    def _observe(self, logits: torch.Tensor) -> None:
        columns = logits.size(-1)
        start = parallel.tp_rank() * columns
        real = columns if self.vocab is None else max(0, min(columns, self.vocab - start))
        if real == 0:
            return
        own = logits[..., :real]
        peak, total = own.amax(), own.sum(dtype=torch.float64)
        self._logit_max = peak if self._logit_max is None else torch.maximum(self._logit_max,
                                                                             peak)
        self._logit_sum = total if self._logit_sum is None else self._logit_sum + total
        self._logit_count += own.numel()

    def take_logit_stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(largest logit, sum of logits, number of logits) seen since `start_capture`, on
        this rank's columns of the tokenizer's vocabulary; the capture stops."""
        stats = (self._logit_max, self._logit_sum, self._logit_count)
        self._capture = False
        self._logit_max, self._logit_sum, self._logit_count = None, None, 0
        return stats
