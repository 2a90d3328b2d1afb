"""Refuse a resume that cannot continue the run, before any file of the run changes.

A resume continues exactly with the same model, data fields, batch, world size and data workers.
Another number of ranks or workers continues the epoch elastically (every remaining sample once,
in another order: ShardLoader.continue_layout); an optimizer state partitioned by rank is
resharded through DeepSpeed's universal checkpoint (checkpoint.make_universal). The checks compare the new config with the run's config.yaml
and the latest checkpoint, and name every differing key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from mmcontrast.config import Config
from mmcontrast.train.checkpoint import checkpoint_ranks, checkpoint_root, intact_tag
from mmcontrast.train.safe_pickle import UnsafeCheckpointError, check_checkpoint_pickles

# Config keys a resumed run must keep: dotted paths into Config.to_dict().
FROZEN_KEYS = ("model", "data.fields", "data.batch_size", "train.accumulation")


class ResumeError(ValueError):
    """A resume that would not continue the run it names."""


def _at(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_resume(cfg: Config, world: int, resume: str) -> str | None:
    """The tag to resume from, or None for a fresh start; raises ResumeError with every reason.

    resume: "" (fresh start), "required" (--resume) or "if_exists" (--resume-if-exists, for
    requeue scripts: a fresh start when there is no checkpoint yet).
    """
    run_dir = Path(cfg.run.dir)
    if not resume:
        return None
    tag = intact_tag(run_dir)  # collective: verifies checksums, falls back past damaged ones
    if tag is None:
        if resume == "if_exists":
            return None
        raise ResumeError(
            f"--resume: {checkpoint_root(run_dir)} holds no checkpoint ('latest' is missing); start without "
            "--resume, or use --resume-if-exists where a first start and a restart share one command"
        )
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ResumeError(f"--resume: {saved_path} is missing, so the run's model cannot be checked")
    saved, now = yaml.safe_load(saved_path.read_text()) or {}, cfg.to_dict()
    problems = [
        f"{key}: the run has {_at(saved, key)!r}, this config {_at(now, key)!r}"
        for key in FROZEN_KEYS
        if _at(saved, key) != _at(now, key)
    ]
    try:  # before DeepSpeed's full unpickler sees any of its files
        check_checkpoint_pickles(checkpoint_root(run_dir) / tag)
    except UnsafeCheckpointError as exc:
        raise ResumeError(str(exc)) from None
    ranks = checkpoint_ranks(run_dir, tag)
    if ranks and ranks != world and 3 in (_at(saved, "train.zero_stage"), cfg.train.zero_stage):
        problems.append(
            f"world size: checkpoint {tag} was written by {ranks} ranks, this run has {world}; a ZeRO stage 3 "
            "run resumes only on the number of ranks that wrote it: DeepSpeed's universal checkpoint gives its "
            "resharded optimizer a wrong Adam step count (23 instead of 13 in mmcontrast's test), which would "
            "change every later update"
        )
    if problems:
        raise ResumeError(
            f"cannot resume {run_dir} from {tag}; nothing was changed. Differences:\n  "
            + "\n  ".join(problems)
        )
    return tag


def write_run_config(cfg: Config, tag: str | None) -> None:
    """config.yaml of the run, and a line per start or resume in config_history.jsonl."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": tag, "config": cfg.to_dict()}
    with open(run_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
