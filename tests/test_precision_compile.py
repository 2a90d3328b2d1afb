"""train.precision amp_bf16 (fp32 weights, bf16 autocast forward) and train.compile."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from mmcontrast.config import AudioTowerConfig, LossConfig, TermConfig
from mmcontrast.losses import Objective
from mmcontrast.train.engine import forward_context
from mmcontrast.train.loop import objective_loss, to_device
from tests.test_grad_cache import _batch, _setup, _vit
from tests.test_train_e2e import _overrides, _train_cmd, world  # noqa: F401


def test_amp_bf16_runs_the_forward_in_bf16_and_keeps_weights_and_gradients_in_fp32():
    modalities = ["image", "text"]
    model, objective = _setup(_vit(), [TermConfig(name="info_nce")], modalities)
    batch = _batch(model, 8, modalities)
    with forward_context("amp_bf16", torch.device("cpu")):
        outputs = model(batch)
    assert outputs["image"].dtype == outputs["text"].dtype == torch.bfloat16
    loss, _ = objective_loss(objective, outputs, batch["present"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the losses score in fp32
    loss.backward()
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32
        for p in model.parameters()
        if p.grad is not None
    )
    with forward_context("fp32", torch.device("cpu")):
        assert model(batch)["image"].dtype == torch.float32
    assert Objective.from_config(LossConfig(terms=[TermConfig()]), modalities)  # unchanged by the context


def test_pure_bf16_keeps_the_waveform_float32_into_the_mel_frontend():
    """A bf16 module (DeepSpeed's bf16) gets bf16 images but the float32 waveform (the STFT and
    log run in float32 on unrounded samples); the mel reaches the backbone in its dtype."""
    modalities = ["image", "text", "audio"]
    audio_cfg = AudioTowerConfig(backbone="resnet10t", n_mels=32, hop_length=320)
    model, _ = _setup(_vit(), [TermConfig(name="info_nce")], modalities, audio=audio_cfg)
    batch = _batch(model, 4, modalities)
    on_device = to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert on_device["image"].dtype == torch.bfloat16
    assert torch.equal(on_device["audio"], batch["audio"])  # float32, unrounded
    frontend = model.towers["audio"].frontend
    mel = frontend(on_device["audio"])
    assert mel.dtype == torch.float32 and mel.is_contiguous(memory_format=torch.channels_last)
    model.bfloat16()
    embeddings = model.encode("audio", on_device["audio"])
    assert embeddings.dtype == torch.bfloat16 and torch.isfinite(embeddings).all()


def _records(run_dir):
    return [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]


@pytest.mark.slow
def test_compiled_amp_bf16_training_follows_fp32_and_keeps_checkpoint_names(repo_root, world, tmp_path):  # noqa: F811
    """Compiled towers under bf16 autocast: the first steps' losses within bf16 rounding of the
    eager fp32 run's, the same parameter names in the checkpoint, fp32 weights."""
    runs = {}
    for name, extra in {
        "fp32": [],
        "compiled-amp": ["train.precision=amp_bf16", "train.compile=true"],
    }.items():
        run_dir = tmp_path / name
        # image and text only: each compiled tower costs CI a compile
        overrides = _overrides(
            world,
            run_dir,
            "data.fields={image: png, text: txt}",
            "train.steps=3",
            "train.checkpoint_every=3",
            "eval.benchmarks=[]",
            *extra,
        )
        subprocess.run(_train_cmd(repo_root, overrides), check=True, timeout=900)
        runs[name] = run_dir
    want, got = _records(runs["fp32"]), _records(runs["compiled-amp"])
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.03), a["step"]
    weights = {n: load_file(runs[n] / "checkpoints/step_0000003/model.safetensors") for n in runs}
    assert weights["fp32"].keys() == weights["compiled-amp"].keys()
    assert all(v.dtype == torch.float32 for v in weights["compiled-amp"].values())
