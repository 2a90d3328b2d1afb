"""Smoke tests of the local SLURM cluster (launch/local_slurm.sh): multi-node steps, requeue,
and who receives `scancel --signal` -- behaviour that launch/slurm.sbatch relies on."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slow


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _wait_files(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"no {missing} after {timeout}s")
        time.sleep(0.1)


def test_two_node_job(slurm_cluster, tmp_path):  # noqa: F811
    script = _write(
        tmp_path / "two.sh",
        """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "head $head"
srun bash -c 'echo $SLURM_NODEID $(hostname) $SLURMD_NODENAME'
# torch's c10d rendezvous dials the first node by name from every node.
srun getent hosts "$head" | sed 's/^/resolved /'
""",
    )
    start = time.monotonic()
    job = slurm_cluster.submit(script, sbatch_args=["--output", str(tmp_path / "two-%j.out")])
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    print(f"2-node job: {time.monotonic() - start:.2f}s from sbatch to gone from squeue")
    info = slurm_cluster.job_info(job)
    assert info["ExitCode"] == "0:0" and info["NumNodes"] == "2"
    out = (tmp_path / f"two-{job}.out").read_text()
    tasks = sorted(re.findall(r"^(\d) (\S+) (node\d)$", out, re.M))
    host = socket.gethostname().split(".")[0]
    assert tasks == [("0", host, "node1"), ("1", host, "node2")], out
    assert "head node1" in out
    assert len(re.findall(r"^resolved \S+\s.*\bnode1\b", out, re.M)) == 2, out


# On its first run the job requeues itself. Slurm then holds it pending (Reason=BeginTime) for
# cred_expire + 1 s after its batch step ends: 121 s by default, 6 s on this cluster. FAST=1
# shows what a batch script can do by itself: ignore the requeue's SIGTERM for long enough
# to move its own begin time to now+2 while the job is pending-and-completing.
REQUEUE = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
d=$1
echo "run ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  date +%s.%N > "$d/requeued_at"
  if [ "${FAST:-0}" = 1 ]; then
    trap '' TERM
    scontrol requeue "$SLURM_JOB_ID"
    scontrol update JobId="$SLURM_JOB_ID" StartTime=now+2
  else
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
date +%s.%N > "$d/restarted_at"
"""


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "begin-now"])
def test_requeue(slurm_cluster, tmp_path, fast):  # noqa: F811
    script = _write(tmp_path / "requeue.sh", REQUEUE)
    job = slurm_cluster.submit(
        script,
        str(tmp_path),
        env={"FAST": "1" if fast else "0"},
        sbatch_args=["--output", str(tmp_path / "requeue.out")],
    )
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    out = (tmp_path / "requeue.out").read_text()
    assert "run 0" in out and "run 1" in out, out
    delay = float((tmp_path / "restarted_at").read_text()) - float((tmp_path / "requeued_at").read_text())
    print(f"requeue ({'begin-now' if fast else 'plain'}): restarted {delay:.2f}s after scontrol requeue")
    if fast:
        assert delay < 5, delay
    else:
        assert 5 <= delay < 20, delay  # cred_expire=5 -> held 6 s, then the next scheduling pass


# Each process logs the SIGUSR1 it gets; .ready once its trap is set.
LOOP = """#!/bin/bash
trap 'echo x >> "$2/$1.usr1"' USR1
touch "$2/$1.ready"
while :; do sleep 0.2; done
"""
# The step's task: a child process, then the task itself becomes a logger too.
TASK = """#!/bin/bash
bash "$1/loop.sh" "child.$SLURM_PROCID" "$1" &
exec bash "$1/loop.sh" "top.$SLURM_PROCID" "$1"
"""
# The batch shell (exec'd into a logger) with a child of its own, and one step on 2 nodes.
BATCH = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
bash "$1/loop.sh" batch-child "$1" &
srun bash "$1/task.sh" "$1" &
exec bash "$1/loop.sh" batch "$1"
"""
ALL = ["batch", "batch-child", "top.0", "top.1", "child.0", "child.1"]


@pytest.mark.parametrize(
    "flags, receivers",
    [
        # Every process of every step on every node (linuxproc: the task and all its
        # descendants), but nothing in the batch step: not the shell, not srun.
        ([], ["top.0", "top.1", "child.0", "child.1"]),
        # The batch step too: the shell and all its descendants.
        (["--full"], ALL),
        # Only the batch shell process, not even its children.
        (["--batch"], ["batch"]),
    ],
    ids=["default", "full", "batch"],
)
def test_scancel_signal(slurm_cluster, tmp_path, flags, receivers):  # noqa: F811
    d = tmp_path
    _write(d / "loop.sh", LOOP)
    _write(d / "task.sh", TASK)
    script = _write(d / "batch.sh", BATCH)
    job = slurm_cluster.submit(script, str(d), sbatch_args=["--output", str(d / "out")])
    try:
        _wait_files([d / f"{n}.ready" for n in ALL], timeout=30)
        slurm_cluster.run("scancel", "--signal=USR1", *flags, job)
        _wait_files([d / f"{n}.usr1" for n in receivers], timeout=10)
        time.sleep(1)  # time for any unexpected delivery to show up
        got = {p.name.removesuffix(".usr1"): p.read_text().count("x") for p in d.glob("*.usr1")}
        assert got == dict.fromkeys(receivers, 1)
        assert slurm_cluster.state(job) == "RUNNING"  # USR1 is caught everywhere
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert slurm_cluster.wait(job, timeout=30) == "CANCELLED"
