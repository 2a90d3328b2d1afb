"""Fabricated training run directories, laid out as the trainer writes them, for export/eval tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from mmcontrast.config import load_config
from mmcontrast.model.multimodal import build_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_COCA_CONFIG = ROOT / "configs" / "demo-coca.yaml"


def randomise_state(model, seed: int, logit_scale: float = 5.0) -> None:
    """Give every buffer a non-default value, so an export that drops one (BatchNorm stats) shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        # Above ln(100): the export must store the clamped value CLIP uses.
        model.clip.logit_scale.fill_(logit_scale)


def make_run_dir(run_dir, steps=(600,), seed: int = 0, overrides=(), config=DEMO_CONFIG):
    """Write config.yaml and one checkpoint per step (different weights each); `latest` -> last step.

    Returns (cfg, {tag: model}) with the models in eval mode.
    """
    run_dir = Path(run_dir)
    cfg = load_config(config, [f"run.dir={run_dir}", *overrides])
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    models = {}
    for i, step in enumerate(steps):
        torch.manual_seed(seed + i)
        model = build_model(cfg.model, cfg.modalities)
        randomise_state(model, seed + i)
        tag = f"step_{step:07d}"
        (run_dir / "checkpoints" / tag).mkdir()
        # As the trainer does: fp32, every tensor its own contiguous copy.
        state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(run_dir / "checkpoints" / tag / "model.safetensors"))
        models[tag] = model.eval()
    (run_dir / "checkpoints" / "latest").write_text(tag)
    return cfg, models
