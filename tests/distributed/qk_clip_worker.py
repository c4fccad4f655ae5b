"""Worker for the QK-clip tests: one clipping step at the launcher's layout, with the LR scaled
to 0 so that the update leaves the weights alone and only the clip changes them.

Per case: a first step with tau out of reach measures every head's maximum logit on batch B
(the hook's table); tau is then set between the smallest and the largest head maximum and the
step is repeated on B. Saved per rank: the tables of both steps, tau, the weights after the
update and before the clip, the weights after the clip, the post-clip maxima (all-reduced) on
each attention's inputs of step 2 and in an evaluation forward of B, and whether every ZeRO
fp32 master fragment equals the module's weights.

usage: torchrun --nproc_per_node N qk_clip_worker.py OUT_DIR CASES_JSON
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

# a script: its folder is on the path
from parity_worker import RandomTokens, run_cases_of_argv, shard_record


def head_maxima(modules, run_forward, shape) -> torch.Tensor:
    """[layers, heads]: each head's largest logit over `run_forward()`'s forwards, all ranks."""
    from stable_megatron import parallel
    from stable_megatron.model.qk_clip import MaxLogitCollector

    collectors = {}
    for number, module in modules.items():
        collectors[number] = MaxLogitCollector()
        module.set_capture_hook("test", collectors[number])
    run_forward()
    table = torch.full(shape, -torch.inf)
    for number, module in modules.items():
        module.set_capture_hook("test", None)
        found = collectors[number].max_logits
        table[number - 1, module.first_head:module.first_head + found.numel()] = found
    parallel.all_reduce_(table, op=dist.ReduceOp.MAX)
    return table


def qkv_params(module) -> dict[str, int]:
    """The name of every parameter of an attention's QKV slot -> its layer number."""
    from stable_megatron.model.attention import SelfAttention

    out = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, SelfAttention):
            for name, _ in sub.linear_qkv.named_parameters():
                out[f"{prefix}.linear_qkv.{name}"] = sub.layer_number
    return out


def run_case(overrides: dict, out: Path) -> None:
    from stable_megatron import ds_adapter, parallel
    from stable_megatron.config import config_from_dict, validate
    from stable_megatron.hooks import StepRunner, model_hooks
    from stable_megatron.methods.qk_clip import QKClipHook as QKClip
    from stable_megatron.train import build_engine, micro_batches

    overrides.pop("steps", None)  # the parity cases' step count: this runs two
    cfg = config_from_dict(overrides)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    state = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, "cpu")
    layout = state.layout
    engine = build_engine(cfg, state, lambda: 0.0)  # LR x 0: the update changes nothing
    hooks = model_hooks(cfg, engine.module)
    clip = next(h for h in hooks if isinstance(h, QKClip))
    runner = StepRunner(engine, hooks)
    data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length)
    accum = engine.gradient_accumulation_steps()

    def batch():
        return micro_batches(data, 0, cfg, layout, state.device, accum)

    named = list(engine.module.named_parameters())
    shape = (cfg.model.num_layers, cfg.model.num_attention_heads)

    clip.tau = float("inf")
    runner.step(1, batch())
    first: dict = {}
    runner.after_step(1, first)
    measured = clip.last_max_logits.clone()
    tau = float(measured.median())  # some heads above, some not
    clip.tau = tau
    inputs = {number: [] for number in clip.modules}  # each attention's inputs in step 2
    handles = [module.register_forward_pre_hook(
        lambda mod, args, kwargs, n=number: inputs[n].append(
            (args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True) for number, module in clip.modules.items()]
    runner.step(2, batch())
    for handle in handles:
        handle.remove()
    before_clip = {name: shard_record(p, p) for name, p in named}
    second: dict = {}
    runner.after_step(2, second)
    measured_again = clip.last_max_logits.clone()
    after_clip = {name: shard_record(p, p) for name, p in named}
    after = head_maxima(clip.modules, lambda: engine.eval_batch(batch()), shape)

    def same_inputs():
        with torch.no_grad():
            for number, module in clip.modules.items():
                for hidden in inputs[number]:
                    module(hidden)

    after_same_inputs = head_maxima(clip.modules, same_inputs, shape)

    master_equal, fragments = True, 0
    for _, param in named:
        found = ds_adapter.master_fragment(param)
        if found is None:
            continue
        fragment, start = found
        fragments += 1
        model = param.detach().reshape(-1).narrow(0, start, fragment.numel())
        master_equal &= torch.equal(fragment, model.to(fragment.dtype))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "layout": {"tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank,
                       "dp_rank": layout.dp_rank, "tp": layout.tp},
            "measured": measured, "measured_again": measured_again, "tau": tau, "after": after,
            "after_same_inputs": after_same_inputs,
            "records": [first, second],
            "before_clip": before_clip, "after_clip": after_clip,
            "master_equal": master_equal, "fragments": fragments,
            "qkv_params": qkv_params(engine.module),
        },
        out / f"rank{layout.rank}.pt",
    )


if __name__ == "__main__":
    run_cases_of_argv(run_case)
