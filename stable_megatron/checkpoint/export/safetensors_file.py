"""The safetensors format: the full merged state dict in one file, with the resolved config and
the checkpoint's provenance as JSON in its metadata; `read_safetensors` reads both back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from stable_megatron.checkpoint.export.common import _provenance, _save_safetensors
from stable_megatron.checkpoint.view import Checkpoint, merged_state_dict


def export_safetensors(ckpt: Checkpoint, out: str | os.PathLike) -> Path:
    """The full merged state dict as one safetensors file; its metadata holds the config
    (`stable_megatron.config`, JSON) and where the weights came from
    (`stable_megatron.checkpoint`, JSON: source, tag, step, consumed samples, layout)."""
    out = Path(out)
    tensors = merged_state_dict(ckpt)
    metadata = {
        "format": "pt",
        "stable_megatron.config": json.dumps(ckpt.config.to_dict()),
        "stable_megatron.checkpoint": json.dumps(_provenance(ckpt)),
        "stable_megatron.names": "<PipelineModule block index>.<state_dict key of the block>, "
                                 "full tensors (tensor-parallel shards merged)",
    }
    _save_safetensors(tensors, out, metadata)
    return out


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, {"config": dict, "checkpoint": dict}) of a file `export_safetensors` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, {"config": json.loads(meta.get("stable_megatron.config", "null")),
                     "checkpoint": json.loads(meta.get("stable_megatron.checkpoint", "null"))}
