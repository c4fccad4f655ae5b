"""Step hooks: the fixed points at which the parts of stable_megatron join a training step.

A training step is `StepRunner.step` (the forwards and backwards of DeepSpeed's `train_batch`,
then its optimizer step) followed by `StepRunner.after_step` once the loop has the step's
record. A hook may act at four points, each optional (the base class does nothing):

- `before_step(step)`: before the forwards (a method's power step, the metrics' capture);
- `before_update(step, grad_norm) -> bool`: inside the optimizer step, once the gradients are
  reduced and before the weights change, with the global gradient norm (inf when DeepSpeed
  found the gradients not finite); True drops the update (the spike guard). Every hook is
  called, whatever an earlier one answered, so that all see every step;
- `after_step(step, record)`: the step's record (loss, LR, grad norm, ...); a hook adds its
  fields to it (metrics, spike verdict, throughput) or reads them (early warning, divergence);
- `state_dict()` / `load_state_dict(state)`: a hook with a `state_key` saves its state in the
  checkpoint's client state under that key.

`before_step` runs the hooks in list order and `after_step` in reverse order, so a hook wraps
the ones after it: in `after_step` it sees the fields they added (the early warning, listed
before the metrics, reads what the metrics measured), and a timer listed first times them all.
`step` is the 1-based number of the step being taken. The only DeepSpeed internals involved
are in `ds_adapter.UpdateGate`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


class StepHook:
    state_key: str | None = None  # the client-state key of `state_dict()`; None: no state

    def before_step(self, step: int) -> None:
        pass

    def before_update(self, step: int, grad_norm: float) -> bool:
        return False

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


def _overrides(hook: StepHook, name: str) -> bool:
    return getattr(type(hook), name) is not getattr(StepHook, name)


class StepRunner:
    """Runs `engine.train_batch` with `hooks` at their points; one per engine."""

    def __init__(self, engine, hooks: Iterable[StepHook]) -> None:
        self.engine, self.hooks = engine, []
        self._step = 0
        self._gate = None
        for hook in hooks:
            self.add(hook)

    def add(self, hook: StepHook) -> None:
        """`hook` after the others, from the next step on."""
        from stable_megatron import ds_adapter

        self.hooks.append(hook)
        if self._gate is None and _overrides(hook, "before_update"):
            self._gate = ds_adapter.UpdateGate(self.engine, self._before_update)

    def _before_update(self, grad_norm: float) -> bool:
        drop = False
        for hook in self.hooks:
            drop = bool(hook.before_update(self._step, grad_norm)) or drop
        return drop

    def step(self, step: int, batches):
        """Optimizer step number `step` over this rank's micro-batches; the DP-averaged loss."""
        self._step = step
        for hook in self.hooks:
            hook.before_step(step)
        if self._gate is not None:
            self._gate.arm()
        loss = self.engine.train_batch(batches)
        if self._gate is not None and not self._gate.fired:
            raise RuntimeError(f"step {step}: DeepSpeed's optimizer step did not run")
        return loss

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        for hook in reversed(self.hooks):
            hook.after_step(step, record)

    def state_dict(self) -> dict[str, Any]:
        return {h.state_key: h.state_dict() for h in self.hooks if h.state_key}

    def load_state_dict(self, client: dict[str, Any]) -> None:
        """Each hook's state from a checkpoint's client state (keys it lacks are left)."""
        for hook in self.hooks:
            if hook.state_key and hook.state_key in client:
                hook.load_state_dict(client[hook.state_key])

    def remove(self) -> None:
        if self._gate is not None:
            self._gate.remove()


def model_hooks(cfg, module) -> list[StepHook]:
    """The step hooks that are part of the model's methods (not of monitoring), for `module`
    (an engine's `module`, or a bare model): every driver of a training step (the Trainer,
    tests, tools) runs these for the model to be the configured one. The Trainer also passes
    its state and engine (`methods.hooks`), for the methods that log through them."""
    from stable_megatron import methods

    return methods.hooks(cfg, module)


class Throughput(StepHook):
    """`step_time`, `tokens_per_sec`, model TFLOP/s per device and (known GPU) MFU. Listed
    first, it times every other hook's work as well as the engine's."""

    def __init__(self, cfg, world: int, device) -> None:
        import torch

        self.cfg, self.world = cfg, world
        self.tokens = cfg.train.global_batch_size * cfg.model.seq_length
        self.device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu")
        self._started = 0.0

    def before_step(self, step: int) -> None:
        self._started = time.time()

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        from stable_megatron.model.size import throughput

        elapsed = time.time() - self._started
        record["tokens_per_sec"] = self.tokens / elapsed
        record.update(throughput(self.cfg, self.tokens / elapsed, self.world, self.device_name))
        record["step_time"] = elapsed
