"""launch/slurm.sbatch on a real local SLURM cluster of 2 emulated nodes: a short demo training
with one process per node, and a preemption (SIGUSR1) that checkpoints, requeues and resumes."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
from tests.test_train_e2e import TINY, world  # noqa: F401  (module fixture)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(cluster, repo_root, world_dir: Path, run_dir: Path, *extra: str) -> str:
    env = {
        "MMCONTRAST_DIR": str(repo_root),
        "PYTHON": sys.executable,
        "RUN_DIR": str(run_dir),
        "RDZV_PORT": str(_free_port()),
        "NPROC_PER_NODE": "1",
    }
    args = [
        str(repo_root / "configs/demo.yaml"),
        *TINY,
        f"data.train={world_dir}/train-{{000000..000003}}.tar",
        f"eval.benchmarks=[{world_dir}/benchmarks/demo-classes, {world_dir}/benchmarks/demo-retrieval]",
        "data.workers=1",
        *extra,
    ]
    out = run_dir.parent / "slurm-%j.out"
    return cluster.submit(
        repo_root / "launch/slurm.sbatch", *args, env=env, sbatch_args=["--output", str(out)]
    )


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_slurm_sbatch_trains_on_two_nodes_one_process_each(slurm_cluster, repo_root, world, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, repo_root, world, run_dir, "train.steps=6", "train.checkpoint_every=3")
    state = slurm_cluster.wait(job, timeout=400)
    output = slurm_cluster.output(job)
    assert state == "COMPLETED", output
    info = slurm_cluster.job_info(job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]"
    assert "on 2 nodes, 1 process(es) each" in output

    records = _records(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # finite
    final = records[-1]
    assert final["step"] == 6 and "val/demo-classes/image/top1" in final
    tag = run_dir / "checkpoints" / "step_0000006"
    # one rank per node: torchrun with 1 process on each of the 2 nodes makes a world of 2
    assert {p.name for p in tag.glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}
    assert (tag / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000006"
    assert not (run_dir / "preempted.json").exists()


def test_slurm_preemption_checkpoints_requeues_and_resumes_without_lost_or_repeated_steps(
    slurm_cluster,  # noqa: F811
    repo_root,
    world,  # noqa: F811
    tmp_path,
):
    steps = 24
    run_dir = tmp_path / "run"
    job = _submit(
        slurm_cluster, repo_root, world, run_dir, f"train.steps={steps}", "train.checkpoint_every=0"
    )
    deadline = time.monotonic() + 300
    while len(_records(run_dir)) < 3:  # training is under way
        assert time.monotonic() < deadline, slurm_cluster.output(job)
        assert slurm_cluster.state(job) is not None, slurm_cluster.output(job)
        time.sleep(0.2)
    # what `#SBATCH --signal=USR1@120` sends before the time limit: USR1 to every step process
    slurm_cluster.run("scancel", "--signal=USR1", job)

    state = slurm_cluster.wait(job, timeout=400)
    output = slurm_cluster.output(job)
    assert state == "COMPLETED", output
    assert int(slurm_cluster.job_info(job)["Restarts"]) == 1, output
    assert "requeueing job" in output and "(restart 1)" in output

    steps_logged = [r["step"] for r in _records(run_dir) if "loss" in r]
    assert steps_logged == list(range(1, steps + 1)), "lost or repeated steps in metrics.jsonl"
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    stopped_at = int(tags[0].split("_")[1])  # the preemption checkpoint (keep_checkpoints=2)
    assert 3 <= stopped_at < steps, tags
    assert tags[-1] == f"step_{steps:07d}"
    assert not (run_dir / "preempted.json").exists()
