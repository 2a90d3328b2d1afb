"""Stop on SIGUSR1 / SIGTERM / SIGINT: finish the step, checkpoint, leave a marker, exit cleanly.

SLURM sends SIGUSR1 before the time limit (`#SBATCH --signal`) and SIGTERM on preemption or
cancel; Ctrl-C sends SIGINT (a second one stops at once). Ranks may see a signal at different
steps, so they agree through the all-reduce each step makes anyway (guard.agree_on_step, with the
loss check); every rank then stops after the same step. Data-loader workers ignore these signals (pipeline.workers_ignore_stop_signals).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

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


def write_marker(run_dir, step: int, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum is not None else "another rank's signal"
    (Path(run_dir) / MARKER).write_text(json.dumps({"step": step, "signal": name}) + "\n")


def clear_marker(run_dir) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
