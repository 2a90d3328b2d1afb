"""Checkpoint -> an open_clip `local-dir` folder, plus the extra (non open_clip) towers.

Folder layout (every file is required by `load_exported`):

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}  (open_clip's own schema)
    open_clip_model.safetensors  the CLIP image/text weights, logit_scale clamped at ln(100)
    <modality>_tower.safetensors one per extra tower, e.g. audio_tower.safetensors
    mmcontrast_config.json       tower configs, modalities, audio preprocessing, source

open_clip.create_model_and_transforms("local-dir:DIR") and open_clip.get_tokenizer("local-dir:DIR")
load the image/text model from it unchanged; `load_exported` loads that part through the same
open_clip path and adds the towers, so tools like clip_benchmark and mmcontrast see the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from mmcontrast.config import AudioTowerConfig, load_config
from mmcontrast.model.multimodal import MAX_LOGIT_SCALE, build_model
from mmcontrast.model.towers import TOWERS, create_tower
from mmcontrast.train.checkpoint import checkpoint_weights, load_weights_file

FORMAT_VERSION = 1
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
MMCONTRAST_CONFIG = "mmcontrast_config.json"
# Tower config dataclasses by modality, to rebuild the towers from plain JSON.
TOWER_CONFIG_TYPES = {"audio": AudioTowerConfig}


class ExportError(RuntimeError):
    """A run directory or an export folder that cannot be used, with the reason in words."""


def tower_weights_name(modality: str) -> str:
    return f"{modality}_tower.safetensors"


# ---------------------------------------------------------------- run dir -> model


def _has_weights(folder: Path) -> bool:
    """model.safetensors, or DeepSpeed's files that checkpoint_weights rebuilds it from."""
    return (folder / "model.safetensors").is_file() or any(folder.glob("*model_states.pt"))


def resolve_checkpoint(run_dir, tag: str | None = None) -> tuple[str, Path]:
    """The (tag, checkpoint folder) to export: the given tag or the one `latest` names."""
    root = Path(run_dir) / "checkpoints"
    if tag is None:
        marker = root / "latest"
        if not marker.is_file():
            found = sorted(p.name for p in root.glob("*") if p.is_dir() and _has_weights(p))
            hint = f"; checkpoints present: {', '.join(found)} (pass tag=...)" if found else ""
            raise ExportError(f"no checkpoint to export in {run_dir}: {marker} does not exist{hint}")
        tag = marker.read_text().strip()
    folder = root / tag
    if not _has_weights(folder):
        raise ExportError(
            f"checkpoint {tag!r} of {run_dir} has no weights: neither {folder / 'model.safetensors'} "
            "nor DeepSpeed's *model_states.pt files exist"
        )
    return tag, folder


def step_of(tag: str) -> int | None:
    match = re.search(r"(\d+)$", tag)
    return int(match.group(1)) if match else None


def load_run_model(run_dir, tag: str | None = None, ema: bool = False):
    """(config, MultimodalModel with the checkpoint's weights, tag) for a training run directory;
    ema: the checkpoint's weight average (train.ema) instead of the trained weights."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{run_dir} is not a run directory: {config_path} does not exist")
    cfg = load_config(config_path)
    tag, folder = resolve_checkpoint(run_dir, tag)
    model = build_model(cfg.model, cfg.modalities)
    weights = folder / "model.safetensors"
    try:
        if ema:  # the checkpoint's <tag>/ema.safetensors, as the loop saved it
            try:
                model.load_state_dict(load_weights_file(run_dir, tag, "ema"), strict=True)
            except FileNotFoundError as exc:
                raise ExportError(
                    f"checkpoint {tag!r} of {run_dir} has no weight average ({exc}): train with train.ema to export one"
                ) from None
        elif weights.is_file():
            # load_model copes with files written by save_model (shared tensors deduplicated) and save_file.
            load_model(model, str(weights), strict=True)
        else:  # a checkpoint saved without it: the fp32 weights rebuilt from DeepSpeed's files
            weights = folder
            model.load_state_dict(checkpoint_weights(folder), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not match the model described by {config_path}: {exc}") from exc
    return cfg, model.eval(), tag


# ---------------------------------------------------------------- writing


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _jsonable(value):
    """Tuples -> lists, recursively, so configs round-trip through JSON unchanged."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_export(folder: Path, cfg, model, run_dir: Path, tag: str, ema: bool = False) -> None:
    preprocess_cfg = _jsonable(open_clip.get_model_preprocess_cfg(model.clip))
    model_cfg = dict(model.clip_cfg)
    # patch dropout is a training-time choice; the exported model sees every patch
    model_cfg["vision_cfg"] = {k: v for k, v in model_cfg["vision_cfg"].items() if k != "patch_dropout"}
    _write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})

    # Scalar logit_scale clamped at ln(100): the value CLIP actually uses.
    clip_state = {k: v.float().cpu().contiguous() for k, v in model.open_clip_state_dict().items()}
    save_file(clip_state, str(folder / OPEN_CLIP_WEIGHTS))

    towers = {}
    for modality, tower in model.towers.items():
        tower_cfg = model.tower_cfgs[modality]
        name = tower_weights_name(modality)
        state = {k: v.detach().float().cpu().contiguous().clone() for k, v in tower.state_dict().items()}
        save_file(state, str(folder / name))
        towers[modality] = {
            "type": getattr(tower_cfg, "type", "timm_audio"),
            # the starting weights are in this folder's file now, not where training found them
            "config": _jsonable(
                {k: v for k, v in dataclasses.asdict(tower_cfg).items() if k != "pretrained"}
            ),
            "weights": name,
        }

    data = cfg.data
    meta = {
        "format_version": FORMAT_VERSION,
        "embed_dim": model.embed_dim,
        "modalities": list(model.modalities),
        "towers": towers,
        # What the eval loader needs to decode shards the way training did.
        "data_fields": dict(data.fields),
        "audio": {
            "sample_rate": data.audio_sample_rate,
            "num_samples": int(round(data.audio_sample_rate * data.audio_seconds)),
        },
        "logit_scale": float(clip_state["logit_scale"].exp()),
        "source": {
            "run_dir": str(run_dir.resolve()),
            "tag": tag,
            "step": step_of(tag),
            "run_name": cfg.run.name,
            "weights": "ema" if ema else "trained",
        },
    }
    _write_json(folder / MMCONTRAST_CONFIG, meta)


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder into place; an earlier export there is replaced whole."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not out_dir.is_dir():
        raise ExportError(f"cannot export to {out_dir}: it exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / MMCONTRAST_CONFIG).is_file():
        # Never delete a folder of someone else's files just because it is in the way.
        raise ExportError(f"cannot export to {out_dir}: it is a non-empty directory that is not an export")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / "export")
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old / "export", out_dir)  # put the previous export back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir, out_dir, tag: str | None = None, ema: bool = False) -> Path:
    """Export a run's latest (or `tag`) checkpoint to `out_dir`, its weight average with `ema`;
    returns the folder's path.

    The folder is written under a temporary name next to `out_dir` and renamed into place, so a
    crash leaves either the previous export or the new one, never a mixture.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, model, tag = load_run_model(run_dir, tag, ema)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_export(tmp, cfg, model, run_dir, tag, ema)
        _install(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------- loading


class ExportedModel(nn.Module):
    """An exported model: open_clip's CLIP (loaded via local-dir) plus the extra towers.

    `encode(modality, x)` matches MultimodalModel.encode, so evaluation code serves both.
    """

    def __init__(self, clip, towers: dict, tokenizer, preprocess, meta: dict):
        super().__init__()
        self.clip = clip
        self.towers = nn.ModuleDict(towers)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.meta = meta
        self.modalities = list(meta["modalities"])
        self.embed_dim = int(meta["embed_dim"])
        self.audio_sample_rate = int(meta["audio"]["sample_rate"])
        self.audio_num_samples = int(meta["audio"]["num_samples"])

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def val_transform(self):
        """Alias of `preprocess`, the name MultimodalModel uses."""
        return self.preprocess

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images.to(self.device), normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens.to(self.device), normalize=True)

    def encode_audio(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.encode("audio", waveforms)

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality == "image":
            return self.encode_image(x)
        if modality == "text":
            return self.encode_text(x)
        if modality not in self.towers:
            raise KeyError(f"this export has no {modality!r} tower; it has {', '.join(self.modalities)}")
        return self.towers[modality](x.to(self.device))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(
            f"{path} is not valid JSON ({exc}); the export is damaged, export it again"
        ) from exc


def _build_tower(modality: str, spec: dict, embed_dim: int) -> nn.Module:
    config_type = TOWER_CONFIG_TYPES.get(modality)
    if config_type is None:
        raise ExportError(f"this mmcontrast version cannot rebuild a {modality!r} tower")
    try:
        tower_cfg = config_type(**spec["config"])
    except TypeError as exc:
        raise ExportError(f"{modality} tower config does not fit {config_type.__name__}: {exc}") from exc
    kind = spec.get("type", "timm_audio")
    # create_tower picks the builder from the config; refuse an export whose recorded type differs.
    if kind not in TOWERS or getattr(tower_cfg, "type", "timm_audio") != kind:
        raise ExportError(
            f"{modality} tower type {kind!r} is not one this mmcontrast builds ({', '.join(TOWERS)})"
        )
    return create_tower(embed_dim, tower_cfg)


def _trust_remote_code_keys(tree, path: str = "") -> list[str]:
    if isinstance(tree, dict):
        found = [f"{path}{k}" for k, v in tree.items() if k == "trust_remote_code" and v]
        for k, v in tree.items():
            found += _trust_remote_code_keys(v, f"{path}{k}.")
        return found
    if isinstance(tree, list):
        return [key for i, v in enumerate(tree) for key in _trust_remote_code_keys(v, f"{path}{i}.")]
    return []


def _refuse_code_in_config(folder: Path, config: dict) -> None:
    """An export is data: refuse a config that would have transformers import Python, either
    with trust_remote_code or from a tokenizer or text model inside the (possibly foreign) folder."""
    asks = _trust_remote_code_keys(config)
    if asks:
        raise ExportError(
            f"{folder / OPEN_CLIP_CONFIG} sets {', '.join(asks)}: loading it would run Python code from "
            "the model files; mmcontrast refuses that"
        )
    text_cfg = (config.get("model_cfg") or {}).get("text_cfg") or {}
    root = folder.resolve()
    for key in ("hf_tokenizer_name", "hf_model_name"):
        value = text_cfg.get(key)
        if not isinstance(value, str) or not value:
            continue
        target = (folder / value).resolve()  # open_clip resolves local-dir names from the folder
        if target == root or root in target.parents:
            raise ExportError(
                f"{folder / OPEN_CLIP_CONFIG}: text_cfg.{key} {value!r} points into the export folder, "
                "whose files could carry Python code; use a tokenizer name, not a path inside the export"
            )


def load_exported(path, device="cpu") -> ExportedModel:
    """Load a folder written by `export_run`; the image/text model comes from open_clip's local-dir."""
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not an export folder: it does not exist or is not a directory")
    required = [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, MMCONTRAST_CONFIG]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"export {folder} is incomplete: missing {', '.join(missing)}")
    meta = _read_json(folder / MMCONTRAST_CONFIG)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"export {folder} has format_version {meta.get('format_version')!r}; this mmcontrast reads {FORMAT_VERSION}"
        )
    towers_spec = meta.get("towers", {})
    missing = [spec["weights"] for spec in towers_spec.values() if not (folder / spec["weights"]).is_file()]
    if missing:
        raise ExportError(f"export {folder} is incomplete: missing {', '.join(missing)}")

    _refuse_code_in_config(folder, _read_json(folder / OPEN_CLIP_CONFIG))
    name = f"local-dir:{folder}"
    clip, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    tokenizer = open_clip.get_tokenizer(name)

    towers = {}
    for modality, spec in towers_spec.items():
        tower = _build_tower(modality, spec, int(meta["embed_dim"]))
        try:
            tower.load_state_dict(load_file(str(folder / spec["weights"])), strict=True)
        except RuntimeError as exc:
            raise ExportError(
                f"{folder / spec['weights']} does not fit the {modality} tower config: {exc}"
            ) from exc
        towers[modality] = tower
    model = ExportedModel(clip, towers, tokenizer, preprocess, meta).to(device)
    return model.eval()
