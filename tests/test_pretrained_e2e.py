"""A real run started from an export with the image tower locked (LiT), a weight EMA beside it,
through the CLI: real DeepSpeed engine, real shards."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcontrast.data.demo import write_demo_world
from mmcontrast.export import export_run
from tests.export_helpers import make_run_dir
from tests.test_train_e2e import TINY, _metrics, _overrides, _train_cmd

pytestmark = pytest.mark.slow

STEPS = 20
# the demo's own model (a ResNet image tower that is most of a step), small batches
DEMO_MODEL = ["data.batch_size=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_demo_world(out, n_train=160, n_val=48, seed=1, samples_per_shard=40)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An export of a (fabricated) trained run of the tiny model: the pretrained model."""
    root = tmp_path_factory.mktemp("source")
    make_run_dir(root / "run", steps=(50,), seed=4)
    return export_run(root / "run", root / "export")


def _run(repo_root, world, run_dir, *extra):
    extra = [
        f"train.steps={STEPS}",
        "train.checkpoint_every=10",
        "train.log_every=5",
        "data.workers=1",
        *extra,
    ]
    tiny = [o for o in TINY if o.startswith(("model.", "data.batch_size"))]  # the demo's model instead
    overrides = [o for o in _overrides(world, run_dir) if o not in tiny]
    subprocess.run(_train_cmd(repo_root, [*overrides, *DEMO_MODEL, *extra]), check=True, timeout=900)


def test_locked_image_tower_from_an_export_with_weight_ema(repo_root, world, source, tmp_path):
    locked, unlocked = tmp_path / "locked", tmp_path / "unlocked"
    both = [f"model.pretrained={source}", f"model.audio.pretrained={source}"]
    both += ["train.ema={decay: 0.8, every: 2}", "train.eval_every=10"]
    _run(repo_root, world, locked, *both, "model.lock={image: true}")
    final = load_file(str(locked / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    initial = load_file(str(source / "open_clip_model.safetensors"))
    image = [k for k in final if k.startswith("clip.visual.")]
    assert image and all(torch.equal(final[k], initial[k.removeprefix("clip.")]) for k in image)
    assert not torch.equal(final["clip.text_projection"], initial["text_projection"])  # text trained

    # the optimizer holds state for the trainable parameters only
    saved = torch.load(
        locked / "checkpoints" / f"step_{STEPS:07d}" / "mp_rank_00_model_states.pt", weights_only=False
    )
    optimizer = saved["optimizer"]
    held = sum(len(g["params"]) for g in optimizer["param_groups"])
    trainable = [k for k in saved["module"] if not k.startswith("clip.visual.") and "running_" not in k]
    trainable = [k for k in trainable if "num_batches_tracked" not in k]
    assert held == len(trainable) == len(optimizer["state"])
    image_numel = sum(final[k].numel() for k in image)
    state_numel = sum(s["exp_avg"].numel() for s in optimizer["state"].values())
    assert state_numel == sum(saved["module"][k].numel() for k in trainable)
    assert image_numel > 0

    # the EMA: evaluated beside the weights, checkpointed, exported on request
    records = _metrics(locked)
    evaluated = [r for r in records if "val_ema/demo-classes/image/top1" in r]
    assert [r["step"] for r in evaluated] == [10, STEPS]
    ema = load_file(str(locked / "checkpoints" / f"step_{STEPS:07d}" / "ema.safetensors"))
    assert all(torch.equal(ema[k], final[k]) for k in image)  # a locked tower's average is itself
    assert not torch.equal(ema["towers.audio.proj.weight"], final["towers.audio.proj.weight"])
    exported = export_run(locked, tmp_path / "export-ema", ema=True)
    tower = load_file(str(exported / "audio_tower.safetensors"))
    assert torch.equal(tower["proj.weight"], ema["towers.audio.proj.weight"])
    meta = json.loads((exported / "mmcontrast_config.json").read_text())
    assert meta["source"]["weights"] == "ema"

    # throughput against the same run unlocked (printed, not asserted: wall clock; the tiny
    # towers leave the data pipeline most of a step, benchmarks/step_overhead.py --lock-image
    # times the step alone)
    _run(repo_root, world, unlocked, *both)
    rates = {}
    for name, run in (("locked", locked), ("unlocked", unlocked)):
        windows = [r["samples_per_s"] for r in _metrics(run) if "samples_per_s" in r]
        rates[name] = statistics.median(windows[1:])  # the first window holds the start-up
    print(
        f"\nsamples/s, median of log windows: image locked {rates['locked']:.1f}, unlocked "
        f"{rates['unlocked']:.1f} ({rates['locked'] / rates['unlocked']:.2f}x)"
    )
    assert "val/demo-classes/image/top1" in _metrics(unlocked)[-1]
