"""What the writers share: the refusal of a model a format cannot express, the checkpoint's
provenance, the tokenizer as Hugging Face files, the safetensors file, a Hugging Face
directory, and the regrouping of the fused QKV rows per head."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from stable_megatron.checkpoint.format import CheckpointError
from stable_megatron.checkpoint.view import Checkpoint, tokenizer_model_of


class NotExpressibleError(CheckpointError):
    """The model cannot be written in the requested format; the message names the config fields."""


def _provenance(ckpt: Checkpoint) -> dict[str, Any]:
    return {"source": str(ckpt.tag_dir.resolve()), "tag": ckpt.tag_dir.name, "step": ckpt.step,
            "consumed_samples": ckpt.consumed_samples, "layout": ckpt.layout,
            "code_version": ckpt.meta.get("code_version")}


def _write_tokenizer(cfg, out: Path, tokenizer: str | os.PathLike | None) -> dict[str, int]:
    """The run's tokenizer as Hugging Face files in `out` (`hf_tokenizer`); its special ids."""
    from stable_megatron.checkpoint.hf_tokenizer import write_hf_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    return write_hf_tokenizer(tokenizer_model_of(cfg, tokenizer), out, cfg.model.seq_length)


def _save_safetensors(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]
                      ) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)


def _save_hf(ckpt: Checkpoint, out: Path, config: dict, tensors: dict[str, torch.Tensor],
             tokenizer: str | os.PathLike | None) -> Path:
    config["stable_megatron"] = _provenance(ckpt)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    config.update(_write_tokenizer(ckpt.config, out, tokenizer))
    _save_safetensors(tensors, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _qkv_rows_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """linear_qkv's output rows, per head `[q_h; k_h; v_h]`, reordered to `[q | k | v]` with
    the heads in order inside each block (GPT-2's c_attn columns)."""
    rest = t.shape[1:]
    per = t.reshape(heads, 3, t.shape[0] // (3 * heads), *rest)
    return per.transpose(0, 1).reshape(t.shape)
