"""Test hooks that inject faults into a real run. Each is set by an environment variable and does
nothing without it; the fault tests and `tests/fault_campaign.py` use them.

MMCONTRAST_TEST_NONFINITE="loss:3,4" or "grad:7@1": the loss (or only its gradient) is NaN at
    those steps, on every rank or only on the one after "@" (train/guard.py must skip them).
MMCONTRAST_TEST_KILL_AT="POINT:STEP[@RANK]": SIGKILL this process at a named point of that step:
    `step` (after the optimizer step, before logging), `checkpoint` (DeepSpeed's files written,
    no manifest or `latest` yet) or `eval` (between two benchmarks of an evaluation). Before
    dying it writes the time to MMCONTRAST_TEST_KILL_STAMP, if set.
MMCONTRAST_TEST_RECORD_KEYS=DIR: each rank appends the step, epoch and sample keys of every batch
    it trains on to DIR/rank<r>.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import torch

log = logging.getLogger("mmcontrast.train")

NONFINITE_ENV = "MMCONTRAST_TEST_NONFINITE"
KILL_ENV = "MMCONTRAST_TEST_KILL_AT"
KILL_STAMP_ENV = "MMCONTRAST_TEST_KILL_STAMP"
KILL_POINTS = ("step", "checkpoint", "eval")
RECORD_KEYS_ENV = "MMCONTRAST_TEST_RECORD_KEYS"

_current_step = 0


def _parse(spec: str, env: str, kinds: tuple[str, ...]) -> tuple[str, set[int], int | None]:
    """ "KIND:STEP,STEP[@RANK]" -> (kind, steps, rank or None)."""
    kind, _, rest = spec.partition(":")
    steps, _, only_rank = rest.partition("@")
    try:
        parsed = {int(s) for s in steps.split(",")}, int(only_rank) if only_rank else None
    except ValueError:
        parsed = None
    if kind not in kinds or parsed is None:
        raise ValueError(f"{env}={spec!r}: expected KIND:STEP[,STEP...][@RANK], KIND one of {kinds}")
    return kind, *parsed


def set_step(step: int) -> None:
    """The step the trainer is working on (1-based), for the kill points."""
    global _current_step
    _current_step = step


def kill_point(point: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    kind, steps, only_rank = _parse(spec, KILL_ENV, KILL_POINTS)
    rank = int(os.environ.get("RANK", 0))
    if kind != point or _current_step not in steps or only_rank not in (None, rank):
        return
    stamp = os.environ.get(KILL_STAMP_ENV)
    if stamp:
        with open(stamp, "w") as f:
            f.write(f"{time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def record_keys(batch: dict) -> None:
    folder = os.environ.get(RECORD_KEYS_ENV)
    if not folder:
        return
    record = {"step": _current_step, "epoch": batch["position"]["epoch"], "keys": list(batch["__key__"])}
    with open(os.path.join(folder, f"rank{os.environ.get('RANK', 0)}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class InjectedFault:
    """The NONFINITE_ENV hook, as a loss hook: `fault(loss, step) -> loss`."""

    def __init__(self, spec: str, rank: int):
        self.kind, self.steps, self.active = "", set(), False
        if not spec:
            return
        self.kind, self.steps, only_rank = _parse(spec, NONFINITE_ENV, ("loss", "grad"))
        self.active = only_rank in (None, rank)
        log.warning("%s=%s: a test hook makes steps %s non-finite", NONFINITE_ENV, spec, sorted(self.steps))

    @classmethod
    def from_env(cls, rank: int) -> InjectedFault:
        return cls(os.environ.get(NONFINITE_ENV, ""), rank)

    def __call__(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if not self.active or step not in self.steps:
            return loss
        return loss * float("nan") if self.kind == "loss" else _NanGradient.apply(loss)
