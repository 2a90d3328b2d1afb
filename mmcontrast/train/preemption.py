"""Stop on SIGUSR1 / SIGTERM / SIGINT: finish the step, checkpoint, leave a marker, exit cleanly.

SLURM sends SIGUSR1 before the time limit (`#SBATCH --signal`) and SIGTERM on preemption or
cancel; Ctrl-C sends SIGINT (a second one stops at once). Ranks may see a signal at different
steps, so they agree through `StopAgreement`: an asynchronous all-reduce per step whose result is
read one step later, so the step never waits for it; every rank then stops after the same step.
Data-loader workers ignore these signals (pipeline.workers_ignore_stop_signals).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("mmcontrast.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
MARKER = "preempted.json"  # in the run dir while the run stopped early and can resume


class StopRequest:
    """Installs the handlers on creation; `close()` restores the previous ones."""

    def __init__(self):
        self.signal: int | None = None
        self._pid = os.getpid()  # forked data-loader workers inherit the handler: they ignore it
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.signal is None:
            log.warning(
                "received %s: finishing this step; then, if every rank still answers, checkpointing "
                "and stopping (press Ctrl-C again to stop at once)",
                signal.Signals(signum).name,
            )
        self.signal = signum

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopAgreement:
    """`poll()` once per step, on every rank: True when some rank had a stop signal at the
    previous poll. Each poll reads the all-reduce the previous one started (long finished by then)
    and starts the next, so the step neither blocks on a collective nor syncs the device: on a
    GPU the flag reaches pinned host memory through a non-blocking copy queued behind the
    all-reduce, and only that copy's event is waited on. `close()` waits for the last one."""

    def __init__(self, stop: StopRequest, device: torch.device):
        self.stop = stop
        self.on_gpu = device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=self.on_gpu)
        self.work = self.copied = None

    def poll(self) -> bool:
        agreed = self._read()
        self.flag.fill_(int(self.stop.signal is not None))
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.on_gpu:
            self.work.wait()  # the current stream waits for the collective; the host does not
            self.host.copy_(self.flag, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        return agreed

    def _read(self) -> bool:
        if self.work is None:
            return False
        if self.on_gpu:
            self.copied.synchronize()
        else:
            self.work.wait()
            self.host.copy_(self.flag)
        self.work = None
        return bool(self.host[0])

    def close(self) -> None:
        self._read()


def write_marker(run_dir, step: int, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum is not None else "another rank's signal"
    (Path(run_dir) / MARKER).write_text(json.dumps({"step": step, "signal": name}) + "\n")


def clear_marker(run_dir) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
