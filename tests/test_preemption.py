"""Stop requests: a signal on any rank stops every rank after the same step."""

from __future__ import annotations

import json
import os
import signal

import torch

from mmcontrast.train.preemption import MARKER, StopAgreement, StopRequest, clear_marker, write_marker
from tests.distributed import run_ranks


def _agree_after_signal(rank, world, signalled_rank, signum):
    stop = StopRequest()
    agreement = StopAgreement(stop, torch.device("cpu"))
    try:
        polls = [agreement.poll()]  # step 1
        if rank == signalled_rank:
            os.kill(os.getpid(), signum)  # during step 2
        polls += [agreement.poll(), agreement.poll()]  # steps 2 and 3
        agreement.close()
        # a forked child (as a data-loader worker) inherits the handler but must not react
        seen = stop.signal
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
            os._exit(0 if stop.signal == seen else 3)
        child_ignored = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        return [polls, stop.signal, child_ignored]
    finally:
        stop.close()


def test_a_signal_on_one_rank_stops_every_rank():
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        results = run_ranks(2, _agree_after_signal, 1, int(signum))
        # read one step later on every rank, so all stop after step 3
        assert [r[0] for r in results] == [[False, False, True], [False, False, True]]
        assert results[0][1] is None and results[1][1] == signum  # only rank 1 saw it
        assert results[0][2] and results[1][2]


def test_handlers_are_restored_on_close():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest()
    assert signal.getsignal(signal.SIGUSR1) == stop._handle
    stop.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_marker_round_trip(tmp_path):
    write_marker(tmp_path, 7, signal.SIGUSR1)
    assert json.loads((tmp_path / MARKER).read_text()) == {"step": 7, "signal": "SIGUSR1"}
    clear_marker(tmp_path)
    clear_marker(tmp_path)  # twice: nothing to remove is fine
    assert not (tmp_path / MARKER).exists()
