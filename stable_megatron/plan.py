"""`stable-megatron plan RECIPE [key=value ...] --nodes N --gpus-per-node G`: a dry run.

Validates the config at world size N x G without starting anything, and prints the parallel
layout (which ranks form which TP / DP / PP groups), parameter counts (total, per stage, per
rank), an estimate of the memory per GPU, the FLOPs per token and the tokens/s expected at a
given MFU, and the exact per-node launch commands (hostfile and SLURM / no-ssh).

A recipe may carry `layouts:`, a mapping world size -> {tp, pp, micro_batch_size}; the entry for
N x G is applied before the command-line overrides (which win), and the launch commands spell
it out, so a training run never depends on it.

Formulas (P = parameters on one GPU, from `model/size.py`; s = seq, b = micro-batch, h = hidden,
a = heads, t = TP, L_s = layers on the stage, V = padded vocabulary, dp = data-parallel size):
- weights: 2 P bytes in bf16 (4 P in fp32); ZeRO-3: divided by dp (plus, not counted, the
  blocks gathered whole while they run);
- gradients: 4 P (fp32 gradient accumulation, DeepSpeed's bf16 optimizer; the fp32 gradients
  in fp32), plus 2 P for the bf16 `.grad` the backward writes first; ZeRO-2 and 3: the fp32
  gradients divided by dp (the bf16 `.grad`s are released bucket by bucket as they are reduced:
  not counted); also not counted, ZeRO's reduce bucket during the backward (in fp32 at ZeRO-1
  and 2 min(P, 5e8) elements, 4 P at the benchmark's medium shape; at ZeRO-3 the largest
  parameter: docs/performance.md#zero-stages);
- optimizer states: ZeRO-1 to 3: 12 P / dp (fp32 master copy, Adam m and v, sharded over DP);
  ZeRO-0 (fp32 only): 8 P (Adam m and v; the weights are the master copy); ZeRO-3 in fp32:
  8 P / dp (the weights' partition is the master copy: `ds_adapter`'s
  `_stage3_master_shares_fp32_weights`);
- activations per micro-batch and layer without recompute (Korthikanti et al. 2022, no
  sequence parallelism; bf16, doubled in fp32): s b h (10 + 24 / t) bytes, plus 5 a s^2 b / t
  when the attention scores are materialised (attention_backend=math; SDPA / FlexAttention on
  GPU do not keep them). `train.recompute` (model/recompute.py) changes this term:
  - selective (the attention kernel recomputed): s b h (10 + 24 / t) per layer, plus one
    layer's 5 a s^2 b / t while it is recomputed; the same as none when the kernel is fused;
  - full (every layer recomputed): each layer's input, 2 s b h, plus one layer's activations
    while it is recomputed.
  The plan prints the configured mode's figure and, beside it, full recompute's. A pipeline
  stage k holds min(pp - k, accumulation steps) micro-batches in flight (1F1B); the first
  stage the most.
- logits on the last stage: s b V / t x 10 bytes (bf16 logits, their fp32 copy, the fp32
  softmax kept by the vocab-parallel cross entropy; 8 bytes in fp32).
- FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L s h, N = parameters in
  matrix multiplies (all but the input embedding; a tied embedding counts once, as the output
  layer), the second term the attention scores and their weighted sum (forward + backward, no
  causal discount). tokens/s = MFU x peak x GPUs / FLOPs per token.
These are estimates: temporaries, communication buffers and the allocator's slack come on top.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from stable_megatron.config import Config, ConfigError, load_config, read_recipe, validate
from stable_megatron.model import size
from stable_megatron.model.size import PEAK_TFLOPS, flops_per_token
from stable_megatron.parallel import Layout

LAYOUT_KEYS = {
    "tp": "parallel.tp", "pp": "parallel.pp", "micro_batch_size": "train.micro_batch_size"
}
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Recipe layouts


def recipe_layouts(recipe: str | Path) -> dict[int, dict[str, int]]:
    """The recipe's `layouts:` (inherited through `base:`), checked: world size -> settings."""
    raw = read_recipe(recipe).get("layouts") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {recipe}: layouts must map a world size to a layout")
    out = {}
    for world, entry in raw.items():
        if not isinstance(world, int) or isinstance(world, bool) or world <= 0:
            raise ConfigError(f"recipe {recipe}: layouts key {world!r} must be a world size > 0")
        if not isinstance(entry, dict):
            raise ConfigError(f"recipe {recipe}: layouts.{world} must be a mapping")
        unknown = sorted(set(entry) - set(LAYOUT_KEYS))
        if unknown:
            raise ConfigError(
                f"recipe {recipe}: unknown key layouts.{world}.{unknown[0]}; valid keys: "
                f"{', '.join(LAYOUT_KEYS)}"
            )
        for key, value in entry.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"recipe {recipe}: layouts.{world}.{key}={value!r}: must be "
                                  f"an integer > 0")
        out[world] = dict(entry)
    return out


def layout_overrides(recipe: str | Path, world: int) -> list[str]:
    """The recipe's layout for `world` as `key=value` overrides ([] if it lists none)."""
    entry = recipe_layouts(recipe).get(world, {})
    return [f"{LAYOUT_KEYS[k]}={v}" for k, v in entry.items()]


# --------------------------------------------------------------------------------------------
# The plan


def groups(world: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Ranks of every TP, DP and PP group, from `parallel.Layout` (TP fastest, then DP, PP)."""
    coords = [Layout.of(world, tp, pp, r) for r in range(world)]

    def by(key) -> list[list[int]]:
        out: dict[tuple, list[int]] = {}
        for c in coords:
            out.setdefault(key(c), []).append(c.rank)
        return list(out.values())

    return {
        "tp": by(lambda c: (c.pp_rank, c.dp_rank)),
        "dp": by(lambda c: (c.pp_rank, c.tp_rank)),
        "pp": by(lambda c: (c.dp_rank, c.tp_rank)),
    }


ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class StageMemory:
    stage: int
    params: int  # per GPU
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float  # without recompute
    activations_recompute: float  # with full recompute
    activations_selective: float  # with selective recompute
    recompute: str = "none"  # the configured train.recompute
    zero_stage: int = 1

    @property
    def activations_configured(self) -> float:
        return {"none": self.activations, "selective": self.activations_selective,
                "full": self.activations_recompute}[self.recompute]

    @property
    def total(self) -> float:
        """With the configured `train.recompute`."""
        return self.weights + self.grads + self.optimizer + self.activations_configured

    @property
    def total_recompute(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations_recompute


@dataclass
class Plan:
    cfg: Config
    nodes: int
    gpus_per_node: int
    layout: Layout  # of rank 0
    accumulation: int
    total_params: int
    stages: list[size.StageParams]
    memory: list[StageMemory]
    flops_per_token: float
    gpu: str
    mfu: float
    by_zero_stage: dict  # ZeRO stage -> StageMemory of pipeline stage 0, for each allowed

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens_per_sec(self) -> float:
        return self.mfu * PEAK_TFLOPS[self.gpu] * 1e12 * self.world / self.flops_per_token

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length


def attention_score_bytes(cfg: Config, tp: int) -> float:
    """One layer's materialised attention scores and probabilities (what selective recompute
    drops), one micro-batch, one TP rank; 0 when the kernel does not keep them."""
    m, b = cfg.model, cfg.train.micro_batch_size
    if m.attention_backend != "math":
        return 0.0
    n = 5 * m.num_attention_heads * m.seq_length**2 * b / tp
    return n * (2 if cfg.train.precision == "fp32" else 1)


def layer_activation_bytes(cfg: Config, tp: int) -> float:
    """One layer, one micro-batch, one TP rank, no recompute."""
    m, b = cfg.model, cfg.train.micro_batch_size
    n = m.seq_length * b * m.hidden_size * (10 + 24 / tp)
    return n * (2 if cfg.train.precision == "fp32" else 1) + attention_score_bytes(cfg, tp)


def stage_memory(cfg: Config, stage: size.StageParams, layout: Layout,
                 accumulation: int, zero_stage: int | None = None) -> StageMemory:
    """The estimate for one pipeline stage at ZeRO stage `zero_stage` (default: the config's)."""
    m, t = cfg.model, cfg.train
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    zero = cfg.parallel.zero_stage if zero_stage is None else zero_stage
    bf16 = t.precision == "bf16"
    p = stage.per_rank
    layers = stage.layers[1] - stage.layers[0] + 1
    in_flight = min(pp - stage.stage, accumulation)
    act_bytes = 2 if bf16 else 4
    per_layer = layer_activation_bytes(cfg, tp)
    scores = attention_score_bytes(cfg, tp)
    layer_input = act_bytes * m.seq_length * t.micro_batch_size * m.hidden_size
    logits = 0.0
    if stage.stage == pp - 1:
        logits = (m.seq_length * t.micro_batch_size * m.padded_vocab_size(tp) / tp
                  * (10 if bf16 else 8))
    weights = p * (2 if bf16 else 4) / (dp if zero == 3 else 1)
    grads = p * (6 if bf16 else 4) if zero < 2 else 4 * p / dp
    if zero == 0:
        optimizer = 8 * p  # the weights are the master copy
    elif zero == 3 and not bf16:
        optimizer = 8 * p / dp  # the weights' partition is the master copy
    else:
        optimizer = 12 * p / dp
    return StageMemory(
        stage=stage.stage,
        params=p,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=layers * in_flight * per_layer + logits,
        activations_recompute=layers * in_flight * layer_input + per_layer + logits,
        activations_selective=layers * in_flight * (per_layer - scores) + scores + logits,
        recompute=t.recompute,
        zero_stage=zero,
    )


def zero_stages_allowed(cfg: Config) -> tuple[int, ...]:
    """The ZeRO stages this config's layout takes (pp > 1: DeepSpeed's pipeline engine, 0-1;
    bf16: not 0)."""
    stages = ZERO_STAGES if cfg.parallel.pp == 1 else (0, 1)
    return tuple(s for s in stages if not (s == 0 and cfg.train.precision == "bf16"))


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, gpu: str = "h100",
              mfu: float = 0.4) -> Plan:
    """Validate `cfg` at nodes x gpus_per_node and compute the plan (raises ConfigError)."""
    if nodes <= 0 or gpus_per_node <= 0:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be > 0")
    if gpu not in PEAK_TFLOPS:
        raise ConfigError(f"--gpu={gpu}: valid GPUs: {', '.join(PEAK_TFLOPS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: must be in (0, 1]")
    world = nodes * gpus_per_node
    validate(cfg, world)  # also resolves the vocabulary
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    layout = Layout.of(world, tp, pp, 0)
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp)
    stages = size.stage_params(cfg, tp, pp)
    return Plan(
        cfg=cfg, nodes=nodes, gpus_per_node=gpus_per_node, layout=layout,
        accumulation=accumulation, total_params=size.total_params(cfg, tp), stages=stages,
        memory=[stage_memory(cfg, s, layout, accumulation) for s in stages],
        by_zero_stage={z: stage_memory(cfg, stages[0], layout, accumulation, z)
                       for z in zero_stages_allowed(cfg)},
        flops_per_token=flops_per_token(cfg), gpu=gpu, mfu=mfu,
    )


# --------------------------------------------------------------------------------------------
# Launch commands


@dataclass
class LaunchSpec:
    recipe: str
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    hosts: list[str]
    master_port: int = 29500
    hostfile: str = "hostfile"


def _train_args(spec: LaunchSpec) -> list[str]:
    return ["--module", "stable_megatron.train", spec.recipe, *spec.overrides]


def hostfile_text(spec: LaunchSpec) -> str:
    return "".join(f"{host} slots={spec.gpus_per_node}\n" for host in spec.hosts)


def hostfile_command(spec: LaunchSpec) -> list[str]:
    """One command on the first node; DeepSpeed reaches the others over ssh (pdsh)."""
    if spec.nodes == 1:
        return ["deepspeed", "--num_gpus", str(spec.gpus_per_node), "--master_port",
                str(spec.master_port), *_train_args(spec)]
    return ["deepspeed", "--hostfile", spec.hostfile, "--num_nodes", str(spec.nodes),
            "--num_gpus", str(spec.gpus_per_node), "--master_addr", spec.hosts[0],
            "--master_port", str(spec.master_port), *_train_args(spec)]


def node_commands(spec: LaunchSpec) -> list[list[str]]:
    """One command per node, no ssh (what launch/slurm.sbatch runs on each node via srun)."""
    return [
        ["deepspeed", "--hostfile", spec.hostfile, "--no_ssh", "--node_rank", str(rank),
         "--master_addr", spec.hosts[0], "--master_port", str(spec.master_port),
         *_train_args(spec)]
        for rank in range(spec.nodes)
    ]


def _join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def launch_text(spec: LaunchSpec, launcher: str = "both") -> str:
    lines = []
    if launcher in ("hostfile", "both"):
        if spec.nodes > 1:
            lines += [f"hostfile mode: write {spec.hostfile} (one line per node), then run on "
                      f"{spec.hosts[0]} (needs passwordless ssh + pdsh):"]
            lines += [f"  {line}" for line in hostfile_text(spec).splitlines()]
        else:
            lines += ["single node:"]
        lines += [f"  {_join(hostfile_command(spec))}"]
    if launcher in ("slurm", "both"):
        lines += [f"per-node mode (SLURM / no ssh; launch/slurm.sbatch does this): the same "
                  f"{spec.hostfile} on every node, then on node i:"]
        for rank, cmd in enumerate(node_commands(spec)):
            lines += [f"  [{spec.hosts[rank]}] {_join(cmd)}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Report


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _groups_line(name: str, gs: list[list[int]], limit: int = 4) -> str:
    shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in gs[:limit])
    more = f" ... [{','.join(map(str, gs[-1]))}]" if len(gs) > limit else ""
    return f"  {name} groups ({len(gs)} of {len(gs[0])}): {shown}{more}"


def format_plan(plan: Plan) -> str:
    cfg, lay = plan.cfg, plan.layout
    m, t = cfg.model, cfg.train
    out = [
        f"world {plan.world} = {plan.nodes} node(s) x {plan.gpus_per_node} GPUs = "
        f"tp {lay.tp} x pp {lay.pp} x dp {lay.dp}",
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {lay.dp} x "
        f"accumulation {plan.accumulation}; {plan.tokens_per_step:,} tokens per step",
        "rank layout (TP fastest, then DP, then PP; rank = pp*dp*tp + dp*tp + tp):",
    ]
    out += [_groups_line(k.upper(), v) for k, v in groups(plan.world, lay.tp, lay.pp).items()]
    out += [f"  node n holds ranks {plan.gpus_per_node}n .. {plan.gpus_per_node}n + "
            f"{plan.gpus_per_node - 1}"]
    out += [
        f"parameters: total {plan.total_params:,} ({_count(plan.total_params)}); "
        f"vocabulary {m.vocab_size:,} padded to {m.padded_vocab_size(lay.tp):,}",
    ]
    for s in plan.stages:
        out.append(f"  stage {s.stage}: layers {s.layers[0]}-{s.layers[1]}, "
                   f"{s.per_rank:,} per GPU ({_count(s.per_rank)}; embedding {_count(s.embedding)},"
                   f" final norm + head {_count(s.head)})")
    out.append(f"memory per GPU (GiB, estimate; {t.precision}, ZeRO-{cfg.parallel.zero_stage} over "
               f"dp {lay.dp}):")
    for mem in plan.memory:
        line = (
            f"  stage {mem.stage}: weights {mem.weights / GIB:.2f} + grads {mem.grads / GIB:.2f}"
            f" + optimizer {mem.optimizer / GIB:.2f} + activations "
            f"{mem.activations_configured / GIB:.2f} (recompute {mem.recompute})"
            f" = {mem.total / GIB:.2f}"
        )
        if mem.recompute != "full":
            line += (f"; with full recompute: activations {mem.activations_recompute / GIB:.2f}"
                     f", total {mem.total_recompute / GIB:.2f}")
        out.append(line)
    out.append(f"  by ZeRO stage (parallel.zero_stage; pipeline stage 0, recompute "
               f"{t.recompute}): weights + grads + optimizer + activations")
    for z, mem in plan.by_zero_stage.items():
        out.append(f"    ZeRO-{z}: {mem.weights / GIB:.2f} + {mem.grads / GIB:.2f} + "
                   f"{mem.optimizer / GIB:.2f} + {mem.activations_configured / GIB:.2f} = "
                   f"{mem.total / GIB:.2f}")
    tps = plan.tokens_per_sec
    step_s = plan.tokens_per_step / tps
    out += [
        f"FLOPs per token: {plan.flops_per_token:.4g} (6 x {size.flop_params(cfg):,} + 12 x "
        f"{m.num_layers} x {m.seq_length} x {m.hidden_size})",
        f"at MFU {plan.mfu:g} on {plan.gpu} ({PEAK_TFLOPS[plan.gpu]:g} TFLOP/s bf16): "
        f"{tps:,.0f} tokens/s, {step_s:.2f} s per step, {t.steps:,} steps in "
        f"{t.steps * step_s / 3600:.1f} h",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Command line

USAGE = ("stable-megatron plan RECIPE [key=value ...] --nodes N --gpus-per-node G "
         "[--gpu h100|a100] [--mfu 0.4] [--hosts h0,h1,...] [--launcher hostfile|slurm|both]")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stable-megatron plan", usage=USAGE,
                                description="Dry run: layout, sizes, memory, speed, commands.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", choices=sorted(PEAK_TFLOPS))
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--hosts", default=None,
                   help="comma-separated node names (default node0,node1,...)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--hostfile", default="hostfile", help="hostfile path in the commands")
    p.add_argument("--launcher", default="both", choices=("hostfile", "slurm", "both", "none"))
    p.add_argument("--print-overrides", action="store_true",
                   help="only print the layout overrides for this world size (for scripts)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        world = args.nodes * args.gpus_per_node
        overrides = [*layout_overrides(args.recipe, world), *args.overrides]
        if args.print_overrides:
            cfg = load_config(args.recipe, overrides)
            make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
            print(" ".join(shlex.quote(o) for o in overrides[: len(overrides) -
                                                            len(args.overrides)]))
            return 0
        hosts = args.hosts.split(",") if args.hosts else [f"node{i}" for i in range(args.nodes)]
        if len(hosts) != args.nodes:
            raise ConfigError(f"--hosts names {len(hosts)} nodes but --nodes={args.nodes}")
        cfg = load_config(args.recipe, overrides)
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"plan: {args.recipe} (config valid at world size {world})")
    print(format_plan(plan), end="")
    if args.launcher != "none":
        spec = LaunchSpec(args.recipe, overrides, args.nodes, args.gpus_per_node, hosts,
                          args.master_port, args.hostfile)
        print(launch_text(spec, args.launcher), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
