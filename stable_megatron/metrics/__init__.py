"""Stability metrics, computed every `metrics.interval` steps and reduced over all parallel
ranks so that rank 0 logs the whole model's values (docs/stability.md, "Stability metrics").

`StabilityMetrics` is a step hook (stable_megatron/hooks.py). On a measured step,
`before_step` switches on the attention statistics capture, the output-norm hooks and the
output-logit capture of the loss function; `before_update` reads the gradients and the weights
the step's forward used, inside the optimizer step before the update, and keeps a copy of the
weights for the update metrics; `after_step` undoes the captures and the hooks and adds the
reduced metrics to the step's record (on rank 0; nothing elsewhere). Steps in between run the
plain model: nothing is registered.
"""

from __future__ import annotations

from stable_megatron import methods
from stable_megatron.hooks import StepHook
from stable_megatron.metrics import attention, logits, norms, tev, updates
from stable_megatron.metrics.parts import model_parts
from stable_megatron.metrics.reduce import Contributions, reduce_metrics


def due(interval: int, step: int) -> bool:
    """Whether optimizer step number `step` (1-based: the step being taken) is measured."""
    return bool(interval) and step % interval == 0


class StabilityMetrics(StepHook):
    def __init__(self, cfg, state, engine) -> None:
        self.cfg, self.state, self.engine = cfg, state, engine
        self.parts = model_parts(engine.module, state.layout.pp_rank)
        self.loss_fn = logits.loss_function(engine)
        # the enabled methods that add metrics (the base class's `add_metrics` adds none)
        self.methods = [m for m in methods.enabled(cfg)
                        if type(m).add_metrics is not methods.Method.add_metrics]
        self._contrib: Contributions | None = None
        self._hooks: norms.OutputNormHooks | None = None
        self._updates: updates.UpdateSnapshot | None = None
        self.muon = muon_optimizer(engine)

    def due(self, step: int) -> bool:
        return due(self.cfg.metrics.interval, step)

    def before_step(self, step: int) -> None:
        if not self.due(step):
            return
        m = self.cfg.metrics
        self._contrib = Contributions()
        if self.loss_fn is not None:
            self.loss_fn.start_capture()
        if m.attention:
            attention.start_capture(self.parts)
        if m.output_norms:
            self._hooks = norms.OutputNormHooks(self.parts, self.cfg.model.num_layers)

    def before_update(self, step: int, grad_norm: float) -> bool:
        if self._contrib is not None:
            self._before_update()
        return False

    def after_step(self, step: int, record: dict) -> None:
        if self._contrib is not None:
            record.update(self._finish())

    def _before_update(self) -> None:
        """Weights and gradients as the step's forward and backward saw them. Under ZeRO-3 the
        norms read each rank's partitions (`ds_adapter.local_weights`, `grad_fragment`); TEV
        gathers its one matrix and the methods one piece of the model at a time
        (`ds_adapter.gathered`: a no-op below stage 3), never the whole model."""
        from stable_megatron import ds_adapter

        cfg, layout, contrib = self.cfg, self.state.layout, self._contrib
        # TEV over the rows a token can select: the tokenizer's ids, not the padding or the
        # rows of a model.vocab_size set above the tokenizer's vocabulary
        num_layers, vocab = cfg.model.num_layers, cfg.tokenizer_vocab_size
        groups = self.parts.groups(num_layers)
        owner = layout.dp_rank == 0
        if self.parts.embedding is not None:
            words = self.parts.embedding.word_embeddings
            with ds_adapter.gathered([words.weight]):
                tev.add_tev(contrib, "tev", words.weight, words.vocab_start_index, vocab, owner)
        if self.parts.head is not None:
            weight = self.parts.head.output_layer.weight
            with ds_adapter.gathered([weight]):
                tev.add_tev(contrib, "tev_out", weight, layout.tp_rank * weight.size(0), vocab,
                            owner)
        norms.add_norms(contrib, groups, norms.param_share(layout), "param_norm", "param_norm",
                        per_group=False)
        if self.methods:  # the metrics the enabled stability methods add, piece by piece
            for piece, module in self.parts.pieces():
                with ds_adapter.gathered(module.parameters()):
                    for method in self.methods:
                        method.add_metrics(contrib, piece, cfg)
        if cfg.metrics.grad_norms:
            shares = norms.grad_shares(self.engine.module, layout)
            norms.add_norms(contrib, groups, lambda p: shares.get(id(p)), "grad_norm",
                            "grad_norm/total")
        lr_of = None
        if self.muon is not None:
            self.muon.record_next_step()  # the Newton-Schulz residuals of this step
            lr_of = self.muon.lr_of
        if cfg.metrics.updates:  # the step's LR: DeepSpeed steps its scheduler after the update
            self._updates = updates.UpdateSnapshot(groups, layout, self.engine.get_lr()[0],
                                                   lr_of)

    def _finish(self) -> dict[str, float]:
        contrib, self._contrib = self._contrib, None
        cfg = self.cfg
        if cfg.metrics.attention:
            attention.stop_capture(contrib, self.parts, cfg.model.num_layers,
                                   cfg.model.num_attention_heads)
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks.contribute(contrib, self.state.layout.tp_rank)
            self._hooks = None
        logits.add_logit_stats(contrib, self.loss_fn, self.state.layout)
        if self.muon is not None:
            add_muon_residuals(contrib, self.muon)
        snapshot, self._updates = self._updates, None
        if snapshot is not None:
            snapshot.contribute(contrib)
        metrics = reduce_metrics(contrib, self.state)
        attention.add_minima(metrics)
        if snapshot is not None and metrics:
            updates.derive(metrics, snapshot.lr)
        return metrics


def muon_optimizer(engine):
    """The engine's Muon optimizer (`train.optimizer=muon`), else None."""
    from stable_megatron import ds_adapter
    from stable_megatron.muon import MuonAdamW

    opt = ds_adapter.base_optimizer(engine)
    return opt if isinstance(opt, MuonAdamW) else None


def add_muon_residuals(contrib: Contributions, opt) -> None:
    """`muon/ns_residual` (mean) and `muon/ns_residual_max` over the matrices Muon
    orthogonalised in this step: ||X X^T - I|| / sqrt(k) of each Newton-Schulz result X
    (muon.orthogonality_residual). Every rank of a stage orthogonalises all of the stage's
    matrices, so the mean weighs the stages alike. A dropped update logs none."""
    residuals = opt.take_residuals()
    if residuals:
        contrib.mean("muon/ns_residual", sum(residuals), len(residuals))
        contrib.max("muon/ns_residual_max", max(residuals))


__all__ = ["StabilityMetrics", "Contributions", "due", "reduce_metrics"]
