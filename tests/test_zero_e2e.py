"""ZeRO-2/3 in float32 and bf16 on 2 real gloo ranks: train, checkpoint, resume, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_e2e import TINY, _train_losses, world  # noqa: F401  (module fixture)

pytestmark = pytest.mark.slow


def _torchrun(
    repo_root, run_dir: Path, world_dir: Path, *extra: str, resume: bool = False, launcher="torchrun"
) -> None:
    """2 ranks through launch/torchrun.sh, or launch/deepspeed.sh with a one-host hostfile."""
    env = {
        **os.environ,
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(29000 + (os.getpid() + hash(str(run_dir))) % 900),
        "PYTHON": sys.executable,
    }
    if launcher == "deepspeed":
        hostfile = run_dir.parent / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        env["HOSTFILE"] = str(hostfile)
    args = [
        *TINY,
        f"data.train={world_dir}/train-{{000000..000003}}.tar",
        "eval.benchmarks=[]",
        "data.workers=1",
        f"run.dir={run_dir}",
        *extra,
    ]
    cmd = ["bash", str(repo_root / f"launch/{launcher}.sh"), str(repo_root / "configs/demo.yaml"), *args]
    subprocess.run(cmd + (["--resume"] if resume else []), check=True, timeout=600, env=env)


def _resume_copy(run_dir: Path, copy: Path, step: int) -> None:
    """The run as it stood at `step`: that checkpoint is the latest, the metrics stop there."""
    shutil.copytree(run_dir, copy)
    root = copy / "checkpoints"
    for tag in root.glob("step_*"):
        if int(tag.name.split("_")[1]) > step:
            shutil.rmtree(tag)
    (root / "latest").write_text(f"step_{step:07d}")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["step"] <= step)
    )


@pytest.mark.parametrize(
    "stage, precision",
    # bf16 master weights under ZeRO-2 resume as under ZeRO-3 (the same DeepSpeed optimizer path)
    [(2, "fp32"), (3, "fp32"), (3, "bf16")],
    ids=["zero2-fp32", "zero3-fp32", "zero3-bf16"],
)
def test_zero_resume_continues_with_identical_losses(repo_root, world, tmp_path, stage, precision):  # noqa: F811
    steps, saved = 6, 3
    extra = [
        f"train.zero_stage={stage}",
        f"train.precision={precision}",
        f"train.steps={steps}",
        f"train.checkpoint_every={saved}",
        "train.keep_checkpoints=4",
        # the preset's tuning keys go with the run (overlap_comm, buckets, stage-3 prefetch)
        f"train.deepspeed={repo_root}/configs/deepspeed/zero{stage}.json",
    ]
    if stage == 3:  # the final evaluation gathers the partitioned weights on every rank
        extra.append(f"eval.benchmarks=[{world}/benchmarks/demo-classes, {world}/benchmarks/demo-retrieval]")
    reference = tmp_path / "reference"
    # one run starts under DeepSpeed's launcher (hostfile) and resumes under torchrun
    launcher = "deepspeed" if (stage, precision) == (2, "fp32") else "torchrun"
    _torchrun(repo_root, reference, world, *extra, launcher=launcher)
    resumed = tmp_path / "resumed"
    _resume_copy(reference, resumed, saved)
    _torchrun(repo_root, resumed, world, *extra, resume=True)

    ref, res = _train_losses(reference), _train_losses(resumed)
    assert sorted(res) == list(range(1, steps + 1))
    for s in range(saved + 1, steps + 1):
        assert res[s]["loss"] == ref[s]["loss"], f"step {s}: {res[s]['loss']} != {ref[s]['loss']}"
        assert res[s]["lr"] == ref[s]["lr"]
    assert len({round(ref[s]["loss"], 6) for s in ref}) == steps  # the losses do move
    for tag in ("step_0000003", "step_0000006"):
        assert {p.name for p in (resumed / "checkpoints" / tag).glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}

    if stage == 3:
        final = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()][-1]
        assert final["step"] == steps and 0 <= final["val/demo-classes/image/top1"] <= 1
        if precision == "fp32":  # evaluated on every rank from the gathered weights, as the export is
            from tests.test_train_e2e import check_final_eval_matches_export

            check_final_eval_matches_export(resumed, world, tmp_path / "eval-export")
        _check_export_matches_deepspeed_consolidation(repo_root, resumed, tmp_path / "export", precision)


def _check_export_matches_deepspeed_consolidation(
    repo_root, run_dir: Path, out: Path, precision: str
) -> None:
    """`mmcontrast export` from the ZeRO-3 run equals DeepSpeed's own zero_to_fp32 merge of the
    partitioned checkpoint, and open_clip loads it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmcontrast.export import load_exported

    subprocess.run(
        [sys.executable, "-m", "mmcontrast.cli", "export", str(run_dir), "--out", str(out)],
        check=True,
        timeout=300,
    )
    exported = load_exported(out)
    merged = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_0000006")
    clip_state = exported.clip.state_dict()
    # bf16 runs keep fp32 master weights in the optimizer: the export carries those
    for name, value in merged.items():
        if name.startswith("clip."):
            key = name.removeprefix("clip.")
            want = value.reshape(clip_state[key].shape)
            if key == "logit_scale":
                want = want.clamp(max=torch.log(torch.tensor(100.0)))
            torch.testing.assert_close(clip_state[key].float(), want.float(), rtol=0, atol=0, msg=key)
        elif name.startswith("towers."):
            modality, key = name.removeprefix("towers.").split(".", 1)
            got = exported.towers[modality].state_dict()[key]
            torch.testing.assert_close(got.float(), value.float(), rtol=0, atol=0, msg=name)


def test_grad_cache_accumulation_on_two_ranks_matches_the_whole_batch(repo_root, world, tmp_path):  # noqa: F811
    """train.accumulation=4 (GradCache through DeepSpeed's accumulation) follows the same
    trajectory as 1: same global batch, same negatives, same updates (no dropout, no BatchNorm)."""
    extra = [
        "data.fields={image: png, text: txt}",
        "data.batch_size=8",
        "train.steps=4",
        "train.zero_stage=2",
        "train.checkpoint_every=0",
    ]
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    _torchrun(repo_root, whole, world, *extra, "model.clip.vision_cfg.patch_dropout=0.0")
    _torchrun(
        repo_root,
        accumulated,
        world,
        *extra,
        "model.clip.vision_cfg.patch_dropout=0.0",
        "train.accumulation=4",
    )
    want, got = _train_losses(whole), _train_losses(accumulated)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5, abs=1e-6), f"step {s}"
