"""A real SLURM cluster on this host for tests, started by launch/local_slurm.sh.

Use the session fixture by importing it into a test module:

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.submit(script)          # sbatch --parsable
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

Or without pytest: ``env = start_cluster(dir)`` ... ``stop_cluster(dir)``. The cluster has
nodes node1..nodeN (one slurmd each, all on this host), one partition ``debug``, no
accounting (no sacct: final states come from ``scontrol show job``, kept MinJobAge=300 s),
and holds a requeued job only ~6 s (cred_expire=5) instead of Slurm's default 121 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "local_slurm.sh"
_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def slurm_missing() -> list[str]:
    """The SLURM/munge programs that are not installed."""
    return [b for b in _BINARIES if shutil.which(b, path=_SBIN_PATH) is None]


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start_cluster(directory: str | os.PathLike, nodes: int = 2, timeout: float = 600) -> dict[str, str]:
    """Start (or reuse) the cluster kept under `directory`; return os.environ plus SLURM_CONF.
    The timeout covers an apt-get install on a fresh machine."""
    proc = _script("up", str(directory), str(nodes), timeout=timeout)
    exports = [line for line in proc.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    if proc.returncode != 0 or not exports:
        raise RuntimeError(
            f"local_slurm.sh up {directory} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return {**os.environ, "SLURM_CONF": exports[-1].split("=", 1)[1]}


def stop_cluster(directory: str | os.PathLike) -> None:
    proc = _script("down", str(directory), timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"local_slurm.sh down {directory} failed:\n{proc.stdout}\n{proc.stderr}")


def parse_job_line(line: str) -> dict[str, str]:
    """`scontrol show job -o` output as a dict; a token without `=` continues the previous
    value (values such as Command may contain spaces)."""
    info: dict[str, str] = {}
    key = None
    for token in line.split():
        name, eq, value = token.partition("=")
        if eq and name:
            key = name
            info[key] = value
        elif key is not None:
            info[key] += " " + token
    return info


@dataclass
class SlurmCluster:
    directory: Path
    env: dict[str, str]
    nodes: int = 2

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (scontrol, squeue, scancel, ...) against this cluster."""
        proc = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
        return proc

    def submit(
        self,
        script: str | os.PathLike,
        *args: str,
        env: dict[str, str] | None = None,
        sbatch_args: tuple[str, ...] | list[str] = (),
    ) -> str:
        """sbatch a script; `env` adds variables to the job's environment. Returns the job id."""
        job_env = {**self.env, **(env or {})}
        proc = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            env=job_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        return parse_job_line(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip())

    def state(self, job_id: str) -> str | None:
        """The job's squeue state (PENDING, RUNNING, ...); None once it has left the queue."""
        proc = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        return proc.stdout.strip() or None

    def output(self, job_id: str) -> str:
        path = self.job_info(job_id).get("StdOut", "")
        try:
            return Path(path).read_text(errors="replace")
        except OSError as e:
            return f"<no output file {path!r}: {e}>"

    def wait(self, job_id: str, timeout: float = 60) -> str:
        """Wait until the job has left the queue (a requeued job stays in it while it waits)
        and return its final JobState (COMPLETED, FAILED, CANCELLED, ...)."""
        deadline = time.monotonic() + timeout
        while self.state(job_id) is not None:
            if time.monotonic() > deadline:
                info = self.job_info(job_id)
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} (Reason={info.get('Reason')}) after "
                    f"{timeout}s\n--- scontrol show job:\n{info}\n--- output:\n{self.output(job_id)}"
                )
            time.sleep(0.5)
        return self.job_info(job_id)["JobState"]

    def wait_until(self, job_id: str, state: str, timeout: float = 30) -> None:
        """Wait until the job is in `state` (e.g. RUNNING)."""
        deadline = time.monotonic() + timeout
        while (current := self.state(job_id)) != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {current}, not {state}, after {timeout}s")
            time.sleep(0.2)


_started: dict[str, int] = {}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A 2-node cluster for the whole session, brought down at its end. Installs the Debian
    packages when missing (root only); skips when they are missing and it is not root."""
    root = os.geteuid() == 0
    missing = slurm_missing()
    if missing and not root:
        pytest.skip(f"SLURM not installed ({', '.join(missing)}) and not root to install it")
    if missing and shutil.which("apt-get") is None:
        pytest.skip(f"SLURM not installed ({', '.join(missing)}) and no apt-get")
    directory = tmp_path_factory.getbasetemp() / "slurm"
    if len(str(directory)) > 70:  # unix socket paths under it must stay short
        directory = Path(tempfile.gettempdir()) / f"slurm-{os.getpid()}"
    key = str(directory)
    try:
        env = start_cluster(directory, nodes=2)
    except RuntimeError as e:
        if root:
            raise
        pytest.skip(f"cannot start a local SLURM cluster as non-root: {e}")
    # Several test modules importing this fixture get one cluster between them.
    _started[key] = _started.get(key, 0) + 1
    try:
        yield SlurmCluster(directory=directory, env=env, nodes=2)
    finally:
        _started[key] -= 1
        if _started[key] == 0:
            stop_cluster(directory)
