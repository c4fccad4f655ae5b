"""Run logging on rank 0: metrics.jsonl (always), TensorBoard, optional W&B, console progress."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from stable_megatron.config import Config


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_progress(record: dict[str, Any], total_steps: int, eta_seconds: float) -> str:
    parts = [f"step {record['step']:>{len(str(total_steps))}}/{total_steps}"]
    parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"grad {record['grad_norm']:.3f}")
    parts.append(f"{record['tokens_per_sec'] / 1000:.1f}k tok/s")
    if "mfu" in record:
        parts.append(f"{record['tflops_per_device']:.0f} TFLOP/s/dev, MFU {record['mfu']:.1%}")
    parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)


class RunLogger:
    """Writes every record to metrics.jsonl and TensorBoard; prints progress. Rank 0 only:
    other ranks get a logger whose methods do nothing."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int = 0) -> None:
        self.enabled = enabled
        self.total_steps = cfg.train.steps
        self.start_step = start_step
        self.start_time = time.time()
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.logging.wandb:
            import wandb  # optional dependency

            self._wandb = wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict())
        self.show_progress = cfg.logging.progress

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self.show_progress and "loss" in record:
            done = step - self.start_step
            elapsed = time.time() - self.start_time
            eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
            print(format_progress(record, self.total_steps, eta), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
