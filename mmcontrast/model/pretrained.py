"""Starting weights from local files: an open_clip checkpoint or local-dir folder for the CLIP
part, an mmcontrast export or a timm checkpoint for the audio tower. Nothing is downloaded.

Files are read with safetensors or torch.load(weights_only=True), so a checkpoint cannot run code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from open_clip.factory import resize_pos_embed, resize_text_pos_embed
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger("mmcontrast.pretrained")

# weights file names open_clip's local-dir loader looks for, in its order of preference
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.pt")
SHOWN_KEYS = 5  # mismatching keys named in an error


class PretrainedError(ValueError):
    """Starting weights that cannot be used, with the reason and the keys in words."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights only), unwrapped as open_clip_train
    and DeepSpeed write them ({"state_dict": ...}, {"module": ...}, "module." prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickler refusal or a file that is not a torch checkpoint
            raise PretrainedError(f"{path}: not a weights-only torch checkpoint ({exc})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_matching(module: nn.Module, state: dict, strict: bool, source: str) -> list[str]:
    """Copy `state` into `module`. strict: refuse any missing, unexpected or misshapen key,
    naming the first few; otherwise load what fits and return the names not loaded."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": misshapen}
    if strict and any(problems.values()):
        described = "; ".join(
            f"{len(keys)} {what} ({', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''})"
            for what, keys in problems.items()
            if keys
        )
        raise PretrainedError(
            f"{source} does not match the model: {described}. Fix the architecture (model.clip / "
            "model.audio) or set model.pretrained_strict: false to load only the tensors that fit"
        )
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    broken = [k for k, v in fitting.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # a NaN start would train on silently until the non-finite guard stops the run
        raise PretrainedError(
            f"{source} holds NaN or infinite values in {len(broken)} tensor(s): {', '.join(broken[:SHOWN_KEYS])}"
        )
    module.load_state_dict(fitting, strict=False)
    not_loaded = missing + [k.split(" ")[0] for k in misshapen]
    if not_loaded:
        log.warning(
            "%s: loaded %d of %d tensors; not loaded (kept their initialisation): %s; ignored: %s",
            source,
            len(fitting),
            len(own),
            ", ".join(not_loaded),
            ", ".join(unexpected) or "none",
        )
    return not_loaded


def clip_weights_file(spec: str) -> Path:
    """The weights file of `spec`: a file, a folder (open_clip local-dir, e.g. an mmcontrast
    export) or "local-dir:FOLDER"."""
    path = Path(spec.removeprefix("local-dir:"))
    if path.is_file():
        return path
    if path.is_dir():
        for name in OPEN_CLIP_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise PretrainedError(
            f"{path} holds no open_clip weights ({', '.join(OPEN_CLIP_WEIGHT_NAMES)}); a folder with "
            "only open_clip_config.json gives the architecture, not the weights"
        )
    raise PretrainedError(f"{path}: no such file or folder")


def load_clip(model, spec: str, strict: bool) -> list[str]:
    """The image/text (CLIP) weights of `spec` into model.clip, through open_clip's own fix-ups:
    a scalar or (1,) logit scale, resized position embeddings."""
    path = clip_weights_file(spec)
    state = read_state_dict(path)
    for key in ("logit_scale", "logit_bias"):  # open_clip stores scalars; this model keeps (1,)
        if key in state and getattr(model.clip, key, None) is not None:
            state[key] = state[key].reshape(getattr(model.clip, key).shape)
    try:  # another image size or context length: interpolated as open_clip does
        resize_pos_embed(state, model.clip)
        resize_text_pos_embed(state, model.clip)
    except (AssertionError, RuntimeError, ValueError):
        pass  # another width: load_matching names the mismatch
    return load_matching(model.clip, state, strict, str(path))


def load_audio(tower: nn.Module, spec: str, strict: bool) -> list[str]:
    """An audio tower's weights: an mmcontrast export folder (its audio_tower.safetensors), an
    audio_tower.safetensors file, or a timm checkpoint of the backbone alone (its classifier is
    dropped and an RGB stem summed to the tower's one mel channel)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "audio_tower.safetensors"
        if not path.is_file():
            raise PretrainedError(
                f"{spec}: an export folder needs audio_tower.safetensors for model.audio.pretrained"
            )
    state = read_state_dict(path)
    if any(k.startswith(("backbone.", "proj.")) for k in state):  # a whole tower (an export)
        return load_matching(tower, state, strict, str(path))
    from timm.models import adapt_input_conv

    backbone = tower.backbone
    head = backbone.default_cfg.get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    stem = backbone.default_cfg.get("first_conv")
    for conv in (stem,) if isinstance(stem, str) else tuple(stem or ()):
        key = f"{conv}.weight"
        if key in state and state[key].shape[1] != 1:
            state[key] = adapt_input_conv(1, state[key])
    return load_matching(backbone, state, strict, f"{path} (timm backbone)")


def load_pretrained(model, model_cfg) -> None:
    """Starting weights of a fresh run (a resume loads its checkpoint instead): model.pretrained,
    or model.clip's local-dir folder, for the CLIP part; model.audio.pretrained for the audio tower."""
    strict = model_cfg.pretrained_strict
    spec = model_cfg.pretrained
    if not spec and isinstance(model_cfg.clip, str) and model_cfg.clip.startswith("local-dir:"):
        spec = model_cfg.clip  # the folder names the architecture and holds the weights
    if spec:
        load_clip(model, spec, strict)
        log.info("image/text weights from %s", spec)
    audio = model_cfg.audio
    if audio is not None and audio.pretrained and "audio" in model.towers:
        load_audio(model.towers["audio"], audio.pretrained, strict)
        log.info("audio tower weights from %s", audio.pretrained)
