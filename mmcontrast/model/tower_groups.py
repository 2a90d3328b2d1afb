"""Which tower a parameter belongs to, its layer group (for layer-wise learning-rate decay and
partial locking), and locking towers (LiT) with open_clip's own lock semantics.

Layer groups follow the libraries: a ViT's or text transformer's blocks as open_clip's lock
counts them (embeddings, one group per block, then the final norm and projection), timm's own
group_matcher for timm backbones (open_clip's TimmModel trunk, the audio tower), whose head or
projection is the last group.
"""

from __future__ import annotations

import re

from timm.models import group_parameters
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.")
_RESNET_LAYER = re.compile(r"(?:^|\.)layer(\d+)\.")
# open_clip's first group of a transformer tower: everything before the first block
_EMBEDDINGS = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "token_embedding.", "cls_emb")


def tower_of(name: str) -> str | None:
    """The modality whose tower holds parameter `name` of a MultimodalModel; None for the logit
    scale and bias, which belong to no tower."""
    if name.startswith("towers."):
        return name.split(".")[1]
    if name.startswith("clip.visual."):
        return "image"
    if name in ("clip.logit_scale", "clip.logit_bias"):
        return None
    return "text"


def tower_modules(model, modality: str) -> list[nn.Module]:
    """The modules that make up one tower of a MultimodalModel."""
    clip = model.clip
    if modality == "image":
        return [clip.visual]
    if modality == "text":
        if hasattr(clip, "text"):  # CustomTextCLIP, CoCa
            return [clip.text]
        return [clip.transformer, clip.token_embedding, clip.ln_final]
    return [model.towers[modality]]


def _timm_groups(module: nn.Module, prefix: str) -> dict[str, int]:
    groups = group_parameters(module, module.group_matcher())
    return {f"{prefix}{name}": gid for gid, names in groups.items() for name in names}


def layer_groups(model) -> dict[str, tuple[str | None, int, int]]:
    """{parameter name: (tower, layer id, the tower's largest layer id)}; layer ids count from
    the input (0) to the projection (largest). The logit scale and bias get (None, 0, 0)."""
    names = [n for n, _ in model.named_parameters()]
    ids: dict[str, int] = {}
    visual = model.clip.visual
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "group_matcher"):  # open_clip TimmModel
        ids.update(_timm_groups(visual.trunk, "clip.visual.trunk."))
    for modality, tower in model.towers.items():
        backbone = getattr(tower, "backbone", None)
        if backbone is not None and hasattr(backbone, "group_matcher"):
            ids.update(_timm_groups(backbone, f"towers.{modality}.backbone."))
    out: dict[str, tuple[str | None, int, int]] = {}
    by_tower: dict[str | None, dict[str, int | None]] = {}
    for name in names:
        tower = tower_of(name)
        if name in ids:
            layer = ids[name]
        elif tower is None:
            layer = 0
        elif (block := _BLOCK.search(name)) is not None:
            layer = int(block.group(1)) + 1
        elif (stage := _RESNET_LAYER.search(name)) is not None:  # open_clip's ModifiedResNet
            layer = int(stage.group(1))
        elif any(part in name for part in _EMBEDDINGS) or name.startswith(
            ("clip.visual.bn", "clip.visual.conv")
        ):
            layer = 0
        else:
            layer = None  # after every block: final norm, projection, head (set below)
        by_tower.setdefault(tower, {})[name] = layer
    for tower, layers in by_tower.items():
        after_blocks = max((v for v in layers.values() if v is not None), default=-1) + 1
        assigned = {name: after_blocks if v is None else v for name, v in layers.items()}
        top = max(assigned.values())
        out.update({name: (tower, layer, top) for name, layer in assigned.items()})
    return out


LOCK_OPTIONS = {
    "image": {"unlocked_groups": int, "freeze_bn_stats": bool},
    "text": {"unlocked_layers": int},
    "audio": {"unlocked_groups": int, "freeze_bn_stats": bool},
}


def lock_towers(model, spec: dict) -> set[str]:
    """Lock towers as `spec` says ({modality: true | false | {options}}); returns the modalities
    locked whole, which then run in eval mode and without autograd.

    true locks every parameter of the tower, projection included. Options follow open_clip_train:
    image {unlocked_groups, freeze_bn_stats} through open_clip's lock_image_tower, text
    {unlocked_layers} through lock_text_tower, audio {unlocked_groups, freeze_bn_stats} through
    timm's layer groups of the backbone plus the projection as the last group. freeze_bn_stats
    keeps the batch-norm statistics of the locked groups as they are (those modules stay in eval
    mode; open_clip would swap in FrozenBatchNorm2d, whose state dict lacks num_batches_tracked
    and so would no longer load the checkpoint).
    """
    whole = set()
    for modality, value in spec.items():
        if value is False:
            continue
        options = {} if value is True else dict(value)
        modules = tower_modules(model, modality)
        if value is True:
            for name, p in model.named_parameters():
                if tower_of(name) == modality:
                    p.requires_grad_(False)
        elif modality == "image":
            model.clip.lock_image_tower(unlocked_groups=options.get("unlocked_groups", 0))
        elif modality == "text":
            model.clip.lock_text_tower(unlocked_layers=options.get("unlocked_layers", 0))
        else:
            _lock_timm_tower(model, modality, options.get("unlocked_groups", 0))
        if not any(p.requires_grad for name, p in model.named_parameters() if tower_of(name) == modality):
            whole.add(modality)
        elif options.get("freeze_bn_stats"):
            for module in modules:
                model.frozen_norms.extend(
                    m
                    for m in module.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and not any(p.requires_grad for p in m.parameters())
                )
    return whole


def _lock_timm_tower(model, modality: str, unlocked_groups: int) -> None:
    """Lock a tower's parameters except its last `unlocked_groups` layer groups."""
    groups = {
        name: (layer, top) for name, (tower, layer, top) in layer_groups(model).items() if tower == modality
    }
    for name, p in model.named_parameters():
        if name in groups:
            layer, top = groups[name]
            p.requires_grad_(layer > top - unlocked_groups)
