"""End to end: real DeepSpeed engine, real shards, real processes (one, torchrun, SIGKILL + resume)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcontrast.data.demo import write_demo_world

pytestmark = pytest.mark.slow

# Tiny towers so a step takes milliseconds; the code path is the demo's.
TINY = [
    "model.clip={embed_dim: 32, vision_cfg: {image_size: 32, layers: 1, width: 32, head_width: 16, patch_size: 8, patch_dropout: 0.3},"
    " text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1}}",
    "model.audio.backbone=resnet10t",
    "model.audio.n_mels=32",
    "data.batch_size=8",
    "data.shuffle_buffer=20",
    "train.warmup=2",
    "train.log_every=1",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_demo_world(out, n_train=160, n_val=48, seed=1, samples_per_shard=40)
    return out


def _overrides(world: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        f"data.train={world}/train-{{000000..000003}}.tar",
        f"eval.benchmarks=[{world}/benchmarks/demo-classes, {world}/benchmarks/demo-retrieval]",
        f"run.dir={run_dir}",
        *extra,
    ]


def _train_cmd(repo_root, overrides, resume=False):
    return [
        sys.executable,
        "-m",
        "mmcontrast.cli",
        "train",
        str(repo_root / "configs/demo.yaml"),
        *overrides,
    ] + (["--resume"] if resume else [])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _metrics(run_dir) if "loss" in r}


# Hard-negative captions, NegCLIP columns and DeGLA with its EMA teacher, and a weight EMA
# (train.ema) beside it: both averages must be checkpointed and restored for the resumed losses
# and the final average to match.
NEGATIVES = [
    "data.negatives=demo",
    "loss.terms=[{name: info_nce, pairs: [[image, audio]]}, {name: negclip, pairs: [[image, text]]},"
    " {name: degla, pairs: [[image, text]], options: {ema: 0.8}}]",
    "train.ema={decay: 0.9, every: 3}",
]


# (plain InfoNCE runs are killed at random moments and compared bit for bit in test_fault_campaign)
@pytest.mark.parametrize("objective", [NEGATIVES], ids=["negatives_degla"])
def test_sigkill_after_checkpoint_then_resume_continues_exactly(repo_root, world, tmp_path, objective):
    steps = 14
    extra = [
        f"train.steps={steps}",
        "train.checkpoint_every=4",
        "data.workers=2",
        "eval.benchmarks=[]",
        *objective,
    ]
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(repo_root, _overrides(world, reference, *extra)), check=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(repo_root, _overrides(world, killed, *extra)))
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved_tag = (killed / "checkpoints" / "latest").read_text().strip()
    saved_step = int(saved_tag.split("_")[1])
    assert saved_step < steps

    subprocess.run(
        _train_cmd(repo_root, _overrides(world, killed, *extra), resume=True), check=True, timeout=600
    )
    ref, res = _train_losses(reference), _train_losses(killed)
    assert max(res) == steps
    resumed_steps = sorted(s for s in res if s > saved_step)
    assert resumed_steps == list(range(saved_step + 1, steps + 1))
    for s in resumed_steps:
        # same batch (data position), same weights + Adam moments (optimizer), same lr (schedule)
        assert res[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
        assert res[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), f"step {s}"
    # Adam state continued: the step counts in the final checkpoints agree
    assert (killed / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"
    if objective:
        # older tags are pruned (keep_checkpoints): the newest carries the teacher
        assert (killed / "checkpoints" / f"step_{steps:07d}" / "teacher.safetensors").is_file()
        assert res[steps]["degla/distill"] > 0 and "negclip/image-text" in res[steps]
        # the weight EMA continued exactly across the kill: equal to the uninterrupted run's
        final = f"step_{steps:07d}"
        for name in ("ema", "teacher"):
            resumed = load_file(str(killed / "checkpoints" / final / f"{name}.safetensors"))
            uninterrupted = load_file(str(reference / "checkpoints" / final / f"{name}.safetensors"))
            assert resumed.keys() == uninterrupted.keys()
            assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), name


@pytest.mark.parametrize("nodes", [1, 2], ids=["one_node", "two_nodes_static_rendezvous"])
def test_torchrun_two_processes_train_and_checkpoint(repo_root, world, tmp_path, nodes):
    """2 ranks: one torchrun with 2 processes, or two torchruns (NODE_RANK 0 and 1, one process
    each) meeting at MASTER_ADDR:MASTER_PORT, as two hosts sharing a filesystem would."""
    run_dir = tmp_path / "ddp"
    env = {
        **os.environ,
        "NNODES": str(nodes),
        "NPROC_PER_NODE": str(2 // nodes),
        "MASTER_PORT": str(29400 + os.getpid() % 500),
        "PYTHON": sys.executable,
    }
    extra = ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=3", "data.workers=1"]
    # a locked tower on 2 ranks: its embeddings (no autograd) enter the gathers, its parameters
    # no gradient all-reduce
    extra.append("model.lock={audio: true}")
    cmd = [
        "bash",
        str(repo_root / "launch/torchrun.sh"),
        str(repo_root / "configs/demo.yaml"),
        *_overrides(world, run_dir, *extra),
    ]
    launched = [subprocess.Popen(cmd, env={**env, "NODE_RANK": str(rank)}) for rank in range(nodes)]
    try:
        codes = [p.wait(timeout=600) for p in launched]
    finally:
        for p in launched:
            p.kill()
    assert codes == [0] * nodes
    losses = _train_losses(run_dir)
    assert sorted(losses) == list(range(1, 7))
    assert all(r["loss"] == r["loss"] for r in losses.values())  # finite
    tag = run_dir / "checkpoints" / "step_0000006"
    assert (
        (tag / "rank0.pt").exists() and (tag / "rank1.pt").exists() and (tag / "model.safetensors").exists()
    )
    # only the final checkpoint carries the full weights file (train.weights_every=0)
    assert not (run_dir / "checkpoints" / "step_0000003" / "model.safetensors").exists()
    evals = [r["step"] for r in _metrics(run_dir) if "val/demo-classes/image/top1" in r]
    assert evals == [3, 6], "periodic (step 3) and final (step 6) evaluations expected"
    if nodes == 1:
        check_final_eval_matches_export(run_dir, world, tmp_path / "export")
        # step 3's weights, rebuilt from DeepSpeed's files, are the ones evaluated at step 3
        check_final_eval_matches_export(run_dir, world, tmp_path / "export-3", step=3)


def check_final_eval_matches_export(
    run_dir: Path, world: Path, export_dir: Path, step: int | None = None
) -> None:
    """The 2-rank in-training evaluation (the final one, or at `step`) equals `mmcontrast eval`
    of that checkpoint's export in one process, and each rank encoded half of every benchmark."""
    from mmcontrast.eval import evaluate_export
    from mmcontrast.export import export_run

    evaluations = [r for r in _metrics(run_dir) if "val/demo-classes/image/top1" in r]
    final = evaluations[-1] if step is None else next(r for r in evaluations if r["step"] == step)
    export_run(run_dir, export_dir, tag=None if step is None else f"step_{step:07d}")
    folders = [world / "benchmarks" / name for name in ("demo-classes", "demo-retrieval")]
    alone = evaluate_export(export_dir, folders, batch_size=16)
    assert {f"val/{k}" for k in alone} <= final.keys()
    for key, value in alone.items():
        if "/encoded/" not in key:  # exact: the same model and the same fractions of right answers
            assert final[f"val/{key}"] == value, key
    for name in ("demo-classes", "demo-retrieval"):
        shares = [final[f"val/{name}/encoded/rank{r}"] for r in (0, 1)]
        assert sum(shares) == alone[f"{name}/encoded/rank0"] and abs(shares[0] - shares[1]) <= 1, shares


def test_broken_shards_train_to_completion_and_skips_are_reported(repo_root, tmp_path):
    from tests.test_pipeline import broken_shards

    urls, expected, good = broken_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    steps = 10  # 7 batches of 2 per epoch: crosses into a second epoch
    subprocess.run(
        _train_cmd(
            repo_root,
            [
                *TINY,
                f"data.train={urls}",
                "eval.benchmarks=[]",
                f"run.dir={run_dir}",
                "data.workers=0",
                "data.batch_size=2",
                "data.resampled=false",  # every epoch reads every shard once
                f"train.steps={steps}",
                "run.wandb=offline",
            ],
        ),
        check=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    losses = _train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    skipped = json.loads((run_dir / "skipped.json").read_text())
    assert set(skipped["keys"]) == set(expected)  # exactly the broken samples, no good one
    assert set(skipped["counts"]) == set(expected.values())
    per_reason = {r: sum(1 for v in expected.values() if v == r) for r in set(expected.values())}
    for reason, n in per_reason.items():  # each epoch meets each broken sample once
        assert skipped["counts"][reason] % n == 0 and skipped["counts"][reason] >= n
    assert losses[steps]["skipped/bad_image"] >= 1  # counts are logged with the metrics
    # wandb offline: the run file exists and holds the history
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert run_files and run_files[0].stat().st_size > 0


def test_wandb_offline_run_file_holds_config_metrics_and_final_eval(repo_root, world, tmp_path):
    from tests.wandb_file import read_run

    run_dir = tmp_path / "run"
    steps = 4
    subprocess.run(
        _train_cmd(
            repo_root,
            _overrides(world, run_dir, f"train.steps={steps}", "data.workers=0", "run.wandb=offline"),
        ),
        check=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run = read_run(run_file)
    assert run["config"]["train"]["steps"] == steps
    assert run["config"]["run"]["dir"] == str(run_dir)

    logged = {r["step"]: r for r in _metrics(run_dir)}
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == list(range(1, steps + 1))
    for step, row in rows.items():
        for key, value in logged[step].items():
            if key != "step":
                assert row[key] == pytest.approx(value, rel=1e-12), (step, key)
    final_eval = {k: v for k, v in rows[steps].items() if k.startswith("val/")}
    assert "val/demo-classes/image/top1" in final_eval and "val/demo-retrieval/image->text/R@1" in final_eval
