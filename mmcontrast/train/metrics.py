"""Metrics to RUN_DIR/metrics.jsonl (one JSON object per line) and to wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def drop_records_after(run_dir, step: int) -> None:
    """Rewrite metrics.jsonl without records past `step` (a resumed run logs them again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLogger:
    """Only rank 0 writes. wandb mode comes from run.wandb (online | offline | disabled)."""

    def __init__(self, run_dir, cfg, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        if cfg.run.wandb != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.run.wandb_project,
                name=cfg.run.name or Path(run_dir).name,
                dir=str(run_dir),
                mode=cfg.run.wandb,
                config=cfg.to_dict(),
                resume="allow",
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
