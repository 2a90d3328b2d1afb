"""Metrics to RUN_DIR/metrics.jsonl (one JSON object per line) and to wandb."""

from __future__ import annotations

import json
import logging
import math
import secrets
import string
from pathlib import Path

log = logging.getLogger("mmcontrast.train")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def drop_records_after(run_dir, step: int, evaluations_at_step: bool = False) -> None:
    """Rewrite metrics.jsonl without records past `step` (a resumed run logs them again).

    evaluations_at_step: also drop evaluation (`val/...`) records of `step` itself: the final
    evaluation follows the final checkpoint, so a run resumed from that checkpoint repeats it.

    A last line cut short by a kill is dropped with a warning naming the file; a damaged line
    before the last is an error naming the file and line, since records would be lost.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not a JSON record; repair or remove it") from None
            log.warning("%s: dropping its damaged last line (a write cut short): %r", path, line[:80])
            continue
        at = record.get("step", 0)
        evaluation = any(key.startswith("val/") for key in record)
        if at < step or (at == step and not (evaluations_at_step and evaluation)):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def wandb_run_id(run_dir) -> str:
    """The run directory's wandb id, made on first use: a resumed or requeued job continues the
    same wandb run instead of starting a new one."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # the characters of wandb's own ids
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


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
                id=wandb_run_id(run_dir),
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
