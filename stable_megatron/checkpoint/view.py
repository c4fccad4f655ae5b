"""The read-only view of a checkpoint: find it, read its files safely, merge the
tensor-parallel shards into full tensors, load them into a model, summarise it, and find the
run's tokenizer. Used by `stable-megatron inspect`, `generate` and the writers of
`checkpoint/export/`; it writes nothing.

A DeepSpeed pipeline checkpoint of stable_megatron is a directory per save ("tag", e.g.
`step00000020`) holding, per block of the `PipelineModule` (global index XX: 0 the embedding,
1..L the transformer layers, L+1 the final norm, L+2 the untied output layer) and per
tensor-parallel rank YY, `layer_XX-model_YY-model_states.pt` (the block's `state_dict`, shards
of the tensor-parallel tensors), plus `mp_rank_*_model_states.pt` (DeepSpeed's engine state and
our client state: step, consumed samples) and ZeRO optimizer shards. Data-parallel replicas
write nothing of their own and pipeline stages only decide which process wrote which
`layer_XX` file, so the layer files of any TP x PP x DP layout are merged the same way.

Which checkpoint: `format.resolve`, as for a resume: a tag directory itself, else the newest
complete checkpoint of a checkpoint directory or of a run directory's `checkpoints/` (not what
`latest` says; a note says so when they differ).

Safety: every file is read with `format.safe_load` (`weights_only=True`): tensors and plain
containers, never any other pickled object (no code runs). The tools never load the optimizer
shards.

Full shapes come from the model itself (`shards.reference_tensors`: the same config built at
TP=1, PP=1 on the meta device, the vocabulary padded as at the checkpoint's TP size); each saved
tensor is compared with its full counterpart (`shards.split_dim`) and merged (`shards.merge`);
anything else is an error. Buffers are merged like parameters, e.g. sigma-reparam's
power-iteration vectors `u`/`v`.

Names in the merged state dict are `<global block index>.<key in the block>`, e.g.
`1.layer.self_attention.linear_qkv.weight`: the same at every layout (and the names of
`PipelineModule.state_dict()` for untied blocks).

The config comes from the tag's `stable_megatron.json` when present, else from an explicit
config file (`config=`), else from `config.yaml` of the run directory (two levels up:
`<run_dir>/checkpoints/<tag>`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stable_megatron import methods
from stable_megatron.checkpoint import shards as sh
from stable_megatron.checkpoint.format import (
    ENGINE_FILE,
    EXTRA_STATE,
    LAYER_FILE_RE,
    META_FILE,
    RUN_CONFIG,
    CheckpointError,
    corrupt_reason,
    latest_pointer,
    layer_file,
    layer_files,
    read_meta,
    resolve,
    safe_load,
    scan,
    verify,
)

# --------------------------------------------------------------------------------------------
# Opening a checkpoint


@dataclass
class Checkpoint:
    """One located checkpoint, its config and layout; no tensor is read yet."""

    tag_dir: Path
    config: Any  # stable_megatron.config.Config, vocab_size resolved
    config_source: str
    meta: dict  # stable_megatron.json, or {} for checkpoints written before it existed
    step: int | None
    consumed_samples: int | None
    layout: dict[str, int]  # tp, pp, dp, world
    layer_files: dict[int, dict[int, Path]]  # block index -> TP rank -> file
    notes: list[str] = field(default_factory=list)

    @property
    def tp(self) -> int:
        return self.layout["tp"]


def _read_config(tag_dir: Path, meta: dict, config: str | os.PathLike | None):
    """(Config, where it came from): the tag's JSON, else `config`, else the run's config.yaml."""
    from stable_megatron.config import ConfigError, config_from_dict, load_config

    run_config = tag_dir.parent.parent / RUN_CONFIG
    try:
        if "config" in meta:
            source = str(tag_dir / META_FILE)
            cfg = config_from_dict(meta["config"])
        elif config is not None:
            source = str(config)
            if not Path(config).is_file():
                raise CheckpointError(f"--config {config}: no such file")
            cfg = load_config(config)
        elif run_config.is_file():
            source = str(run_config)
            cfg = load_config(run_config)
        else:
            raise CheckpointError(
                f"{tag_dir}: no {META_FILE} and no {RUN_CONFIG} in the run directory "
                f"({run_config.parent}): pass the run's config with --config"
            )
    except ConfigError as err:
        raise CheckpointError(f"{source}: not a config this version can read: {err}") from None
    if cfg.model.vocab_size is None:
        from stable_megatron.config import resolve_vocab

        try:
            resolve_vocab(cfg)
        except ConfigError as err:
            raise CheckpointError(f"{source}: model.vocab_size is not set and the tokenizer "
                                  f"cannot be read: {err}") from None
    return cfg, source


def _missing_shards(tag_dir: Path, missing: list[tuple[int, int]]) -> CheckpointError:
    first = ", ".join(
        f"{layer_file(i, r)} (block {i}, tensor-parallel rank {r})" for i, r in missing[:3]
    )
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return CheckpointError(f"{tag_dir}: missing shard {first}{more}")


def open_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None
                    ) -> Checkpoint:
    """Find the checkpoint at `path` (`format.resolve`, as a resume) and read its config, step
    and layout; checks the files against the manifest and that every block has a file for every
    tensor-parallel rank. Tensors are read later (`read_tensors`)."""
    tag_dir = resolve(path, legacy=True)
    files = layer_files(tag_dir)
    if not files:
        raise CheckpointError(
            f"{tag_dir}: no layer_XX-model_YY-model_states.pt files: not a DeepSpeed pipeline "
            f"checkpoint (or its model files were removed)"
        )
    meta = read_meta(tag_dir, missing_ok=True)
    cfg, source = _read_config(tag_dir, meta, config)
    if meta:
        verify(tag_dir, meta)
    notes: list[str] = []
    reason = corrupt_reason(tag_dir)
    if reason is not None:
        notes.append(f"marked corrupt: {reason}")
    if tag_dir != Path(path):
        notes += [f"{bad.name} is corrupt and was passed over: {why}"
                  for bad, why in scan(tag_dir.parent)[1]]
    pointer = latest_pointer(tag_dir.parent)
    if tag_dir != Path(path) and pointer not in (None, tag_dir.name):
        notes.append(f"`latest` names {pointer}, not the newest complete checkpoint "
                     f"{tag_dir.name} (a save killed before updating it); a resume loads "
                     f"{tag_dir.name} too")
    engine: dict = {}
    if not {"step", "consumed_samples", "layout"} <= meta.keys():
        if not (tag_dir / ENGINE_FILE).is_file():
            raise CheckpointError(f"{tag_dir}: missing {ENGINE_FILE} (DeepSpeed's engine state: "
                              f"step and layout) and no {META_FILE}")
        engine = safe_load(tag_dir / ENGINE_FILE)
        if not isinstance(engine, dict):
            raise CheckpointError(f"{tag_dir / ENGINE_FILE}: corrupt (expected a dict)")
    if "layout" in meta:
        layout = {k: int(meta["layout"][k]) for k in ("tp", "pp", "dp", "world")}
    else:
        dims = engine.get("checkpoint_parallel_dimensions") or {}
        tp = int(dims.get("tp_degree", cfg.parallel.tp))
        pp = int(dims.get("pp_degree", cfg.parallel.pp))
        dp = int(engine.get("dp_world_size", 1))
        layout = {"tp": tp, "pp": pp, "dp": dp, "world": tp * pp * dp}
    step = meta.get("step", engine.get("step", engine.get("global_steps")))
    consumed = meta.get("consumed_samples",
                        engine.get("consumed_samples", engine.get("global_samples")))
    tp = layout["tp"]
    if config is not None and "config" in meta:
        notes.append(f"--config {config} not used: the checkpoint's {META_FILE} has its config")
    if cfg.parallel.tp != tp or cfg.parallel.pp != layout["pp"]:
        notes.append(f"the config says tp={cfg.parallel.tp}, pp={cfg.parallel.pp}; the "
                     f"checkpoint was written at tp={tp}, pp={layout['pp']}")
    by_block: dict[int, dict[int, Path]] = {}
    for (index, rank), file in sorted(files.items()):
        if rank >= tp:
            raise CheckpointError(f"{file}: a shard of tensor-parallel rank {rank}, but the "
                              f"checkpoint was written at tp={tp}")
        by_block.setdefault(index, {})[rank] = file
    missing = [(i, r) for i in range(max(by_block) + 1) for r in range(tp)
               if r not in by_block.get(i, {})]
    if missing:
        raise _missing_shards(tag_dir, missing)
    return Checkpoint(tag_dir=tag_dir, config=cfg, config_source=source, meta=meta, step=step,
                      consumed_samples=consumed, layout=layout, layer_files=by_block,
                      notes=notes)


# --------------------------------------------------------------------------------------------
# Merging tensor-parallel shards


@dataclass
class TensorInfo:
    name: str  # "<block>.<key>"
    block: int
    key: str
    shape: tuple[int, ...]  # full
    dtype: str
    kind: str  # "param" or "buffer"
    split_dim: int | None  # the tensor-parallel split dimension; None: replicated

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def read_tensors(ckpt: Checkpoint, merge: bool = True):
    """(infos, tensors): a `TensorInfo` per tensor of the model in block order and, with
    `merge`, the full tensors by name (rank 0's copy of replicated tensors, the shards
    concatenated along `split_dim` otherwise). Every file is checked against the model of the
    checkpoint's config; the first problem raises `CheckpointError` naming the file and tensor."""
    tp = ckpt.tp
    reference = sh.reference_tensors(ckpt.config, tp)
    kinds = sh.parameter_kinds(ckpt.config) if tp > 1 else {}
    present, expected = set(ckpt.layer_files), set(reference)
    if expected - present:
        raise _missing_shards(ckpt.tag_dir, [(i, r) for i in sorted(expected - present)
                                             for r in range(tp)])
    if present - expected:
        index = min(present - expected)
        raise CheckpointError(
            f"{ckpt.layer_files[index][0]}: unexpected block {index}: the model of this config "
            f"saves blocks {min(expected)}..{max(expected)} (config from {ckpt.config_source})"
        )
    infos: list[TensorInfo] = []
    tensors: dict[str, torch.Tensor] = {}
    for index in sorted(reference):
        files = ckpt.layer_files[index]
        shards = []
        for rank in range(tp):
            state = safe_load(files[rank], mmap=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{files[rank]}: corrupt (expected a state dict, got "
                                  f"{type(state).__name__})")
            shards.append({k: v for k, v in state.items() if not k.endswith(EXTRA_STATE)})
        for rank, state in enumerate(shards):
            extra = sorted(set(state) - set(reference[index]))
            absent = sorted(set(reference[index]) - set(state))
            if absent:
                raise CheckpointError(f"{files[rank]}: no tensor {absent[0]}, which the model of "
                                  f"this config has (config from {ckpt.config_source})")
            if extra:
                raise CheckpointError(f"{files[rank]}: unexpected entry {extra[0]}: not in the "
                                  f"model of this config (config from {ckpt.config_source})")
        for key, ref in reference[index].items():
            values = [state[key] for state in shards]
            for rank, value in enumerate(values):
                if not torch.is_tensor(value):
                    raise CheckpointError(f"{files[rank]}: {key} is a {type(value).__name__}, "
                                      f"not a tensor")
            shard = tuple(values[0].shape)
            dim = sh.split_dim(shard, ref.shape, tp)
            for rank, value in enumerate(values):
                if dim == sh.INVALID or tuple(value.shape) != shard:
                    raise CheckpointError(
                        f"{files[rank]}: {key} has shape {list(value.shape)}, neither the "
                        f"full shape {list(ref.shape)} nor a 1/{tp} split of it along one "
                        f"dimension (config from {ckpt.config_source})"
                    )
            name = f"{index}.{key}"
            infos.append(TensorInfo(name, index, key, ref.shape,
                                    str(values[0].dtype).removeprefix("torch."), ref.kind, dim))
            if not merge:
                continue
            if dim is None and any(not torch.equal(values[0], v) for v in values[1:]):
                ckpt.notes.append(f"{name}: replicated over TP but the ranks' copies differ; "
                                  f"rank 0's is used")
            tensors[name] = sh.merge(values, dim, sh.stride_of(kinds.get(name))).clone()
    return infos, tensors


def merged_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The full state dict (`<block>.<key>` -> tensor) of the checkpoint."""
    return read_tensors(ckpt)[1]


def load_into_model(model, state: dict[str, torch.Tensor]) -> None:
    """Load a merged state dict into a `PipelineModule` built at TP=1, PP=1 from
    `reference_config(cfg, tp)`, block by block as DeepSpeed does."""
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        block, key = name.split(".", 1)
        by_block.setdefault(int(block), {})[key] = value
    for index, fn in enumerate(model.forward_funcs):
        if not hasattr(fn, "load_state_dict"):
            continue
        result = fn.load_state_dict(by_block.pop(index, {}), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"block {index}: missing {missing}, unexpected "
                              f"{result.unexpected_keys}")
    if by_block:
        raise CheckpointError(f"blocks {sorted(by_block)} are not in the model")


# --------------------------------------------------------------------------------------------
# Summary


def _disk_usage(tag_dir: Path) -> dict[str, int]:
    usage = {"total_bytes": 0, "model_bytes": 0, "optimizer_bytes": 0, "other_bytes": 0,
             "files": 0}
    for path in tag_dir.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        usage["files"] += 1
        usage["total_bytes"] += size
        if LAYER_FILE_RE.match(path.name):
            usage["model_bytes"] += size
        elif path.name.endswith("optim_states.pt"):
            usage["optimizer_bytes"] += size
        else:
            usage["other_bytes"] += size
    return usage


def summary(path: str | os.PathLike | Checkpoint, config: str | os.PathLike | None = None
            ) -> dict[str, Any]:
    """What a checkpoint holds: step, consumed samples, layout, config source, every tensor
    (name, full shape, dtype, numel, kind, TP split dimension), parameter count, size on disk."""
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, config)
    infos, _ = read_tensors(ckpt, merge=False)
    m = ckpt.config.model
    return {
        "path": str(ckpt.tag_dir),
        "tag": ckpt.tag_dir.name,
        "step": ckpt.step,
        "consumed_samples": ckpt.consumed_samples,
        "layout": ckpt.layout,
        "config_source": ckpt.config_source,
        "code_version": ckpt.meta.get("code_version"),
        "model": {
            "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "num_attention_heads": m.num_attention_heads, "ffn_size": m.ffn_size,
            "seq_length": m.seq_length, "vocab_size": m.vocab_size,
            "padded_vocab_size": m.padded_vocab_size(ckpt.tp),
            "tie_embeddings": m.tie_embeddings, "position_embedding": m.position_embedding,
            **{key: value for method in methods.methods()
               for key, value in method.summary(ckpt.config).items()},
            "methods": [text for method in methods.methods()
                        if (text := method.describe(ckpt.config)) is not None],
        },
        "total_params": sum(t.numel for t in infos if t.kind == "param"),
        "total_buffer_values": sum(t.numel for t in infos if t.kind == "buffer"),
        "num_tensors": len(infos),
        "disk": _disk_usage(ckpt.tag_dir),
        "tensors": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel,
             "kind": t.kind, "split_dim": t.split_dim}
            for t in infos
        ],
        "notes": list(ckpt.notes),
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary(info: dict[str, Any], tensors: bool = False) -> str:
    m, lay, disk = info["model"], info["layout"], info["disk"]
    described = [*m["methods"], f"{m['position_embedding']} positions",
                 "tied embeddings" if m["tie_embeddings"] else "untied embeddings"]
    lines = [
        f"checkpoint   {info['path']}",
        f"step         {info['step']}   consumed samples {info['consumed_samples']}",
        f"layout       tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']} (world {lay['world']})",
        f"model        {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_attention_heads']} heads, ffn {m['ffn_size']}, seq {m['seq_length']}, "
        f"vocab {m['vocab_size']} (padded {m['padded_vocab_size']})",
        f"             {', '.join(described)}",
        f"parameters   {info['total_params']:,}"
        + (f" (+ {info['total_buffer_values']:,} buffer values)"
           if info["total_buffer_values"] else "")
        + f" in {info['num_tensors']} tensors",
        f"on disk      {_bytes(disk['total_bytes'])} in {disk['files']} files (model "
        f"{_bytes(disk['model_bytes'])}, optimizer {_bytes(disk['optimizer_bytes'])}, other "
        f"{_bytes(disk['other_bytes'])})",
        f"config       {info['config_source']}"
        + (f" (code {info['code_version']})" if info.get("code_version") else ""),
    ]
    lines += [f"note         {note}" for note in info["notes"]]
    if tensors:
        rows = [(t["name"], "x".join(map(str, t["shape"])), t["dtype"], f"{t['numel']:,}",
                 t["kind"], "replicated" if t["split_dim"] is None else f"dim {t['split_dim']}")
                for t in info["tensors"]]
        header = ("name", "shape", "dtype", "numel", "kind", "tp split")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        for row in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def tokenizer_model_of(cfg, override: str | os.PathLike | None = None) -> Path:
    """The sentencepiece model of the run `cfg` describes: the built-in corpus's (prepared again
    in the data cache if it is gone), `data.tokenizer_model`, or `override`; checked against
    the vocabulary the model was trained with."""
    import sentencepiece as spm

    if override is not None:
        path = Path(override)
    elif cfg.data.source == "builtin":
        from stable_megatron.data.dataset import prepare_builtin_data

        path = Path(prepare_builtin_data(cfg.data.cache_dir,
                                         vocab_size=cfg.data.vocab_size).tokenizer_model)
    else:
        path = Path(cfg.data.tokenizer_model or "")
    if not path.is_file():
        raise CheckpointError(f"tokenizer model {path} not found: pass the run's sentencepiece "
                              f"model with --tokenizer")
    size = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    if size != cfg.tokenizer_vocab_size:
        raise CheckpointError(f"{path}: {size} tokens, but the model was trained with "
                              f"{cfg.tokenizer_vocab_size}")
    return path
