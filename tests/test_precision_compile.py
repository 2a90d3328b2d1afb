"""train.precision amp_bf16 (fp32 weights, bf16 autocast forward) and train.compile."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from mmcontrast.config import AudioTowerConfig, LossConfig, TermConfig
from mmcontrast.losses import Objective
from mmcontrast.train.loop import to_device, train_step
from tests.distributed import run_ranks
from tests.test_grad_cache import _batch, _setup, _vit
from tests.test_train_e2e import _overrides, _train_cmd, world  # noqa: F401


def _amp_engine_dtypes(_rank, _world, root: str):
    """For amp_bf16 at ZeRO 0 and 2, one train_step on DeepSpeed's engine as the trainer runs it:
    the dtypes of every Linear's output in the forward, of the loss, the weights and the
    gradients, and (stage 2) the dtypes DeepSpeed reduces the gradients in."""
    from pathlib import Path

    from mmcontrast.config import load_config
    from mmcontrast.model.multimodal import build_model
    from mmcontrast.train.engine import build_engine
    from tests.test_train_e2e import TINY

    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed asks for it; run_ranks starts no launcher
    # DeepSpeed's forward asks torch.is_autocast_enabled() with no device, which reads CUDA's
    # state: on a GPU it sees an autocast entered outside it and switches it off, on CPU it does
    # not see it. Answer for the CPU as a GPU would for CUDA, so the GPU's behaviour shows here.
    cuda_style = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda device_type=None: cuda_style(device_type or "cpu")
    found = {}
    for stage in (0, 2):
        cfg = load_config(
            Path(__file__).parents[1] / "configs/demo.yaml",
            [*TINY, "train.precision=amp_bf16", f"train.zero_stage={stage}", f"run.dir={root}/z{stage}"],
        )
        modalities = ["image", "text"]
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.modalities)
        engine = build_engine(model, cfg)
        objective = Objective.from_config(LossConfig(terms=[TermConfig(name="info_nce")]), modalities)
        linear_outputs, grads, seen = set(), set(), {}
        for module in engine.module.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, out, into=linear_outputs: into.add(str(out.dtype)))
        for param in engine.module.parameters():
            param.register_hook(lambda grad, into=grads: into.add(str(grad.dtype)))

        def record_loss(loss, into=seen):  # train_step's test hook sees the loss it backpropagates
            into["loss"] = str(loss.dtype)
            return loss

        batch = to_device(_batch(model, 8, modalities), engine.device, torch.float32)
        train_step(engine, objective, batch, 1, loss_hook=record_loss)  # as the trainer steps
        report = {
            "linear_outputs": sorted(linear_outputs),
            "loss": seen["loss"],
            "weights": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "grads": sorted(grads),
        }
        if stage == 2:
            report["reduced_in"] = sorted(
                {str(engine.optimizer.get_param_comm_dtype(p)) for p in engine.module.parameters()}
            )
        report["engine_autocast"] = engine.torch_autocast_enabled()
        found[stage] = report
    return found


def test_amp_bf16_runs_the_engines_forward_in_bf16_and_keeps_weights_and_gradients_in_fp32(tmp_path):
    """DeepSpeed's engine switches off an autocast entered outside its forward on a GPU: amp_bf16
    must be its own torch_autocast section, or the "bf16" run is fp32 (as it was: 0.65x
    open_clip_train on an H200, fp32 GEMM kernels in the profile)."""
    (found,) = run_ranks(1, _amp_engine_dtypes, str(tmp_path), timeout=300)
    for stage, report in found.items():
        assert report["linear_outputs"] == ["torch.bfloat16"], (stage, report)
        assert report["loss"] == "torch.float32", (stage, report)  # the losses score in fp32
        assert report["weights"] == report["grads"] == ["torch.float32"], (stage, report)
        assert report["engine_autocast"], stage  # the engine's own torch_autocast section
    assert found[2]["reduced_in"] == ["torch.float32"]  # no gradient is reduced in bf16


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
