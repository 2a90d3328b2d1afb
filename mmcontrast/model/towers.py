"""Registry of extra towers (beyond open_clip's image/text): modality config -> nn.Module.

Every builder takes (embed_dim, tower_config) and returns a module mapping the modality's batch
tensor to an L2-normalised (b, embed_dim) embedding, as timm's create_model does for backbones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from mmcontrast.model.audio import AudioTower

TOWERS: dict[str, Callable[..., nn.Module]] = {}


def register_tower(name: str):
    def wrap(fn):
        TOWERS[name] = fn
        return fn

    return wrap


@register_tower("timm_audio")
def timm_audio(embed_dim: int, cfg) -> nn.Module:
    # starting weights are loaded after the build (model/pretrained.py), on fresh runs only
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("type", "pretrained")}
    return AudioTower(embed_dim, **options)


def create_tower(embed_dim: int, cfg) -> nn.Module:
    kind = getattr(cfg, "type", "timm_audio")
    if kind not in TOWERS:
        raise ValueError(f"unknown tower type {kind!r}; registered: {', '.join(sorted(TOWERS))}")
    return TOWERS[kind](embed_dim, cfg)
