"""The multimodal model: open_clip's CLIP for image + text, registered towers for the rest."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
from pathlib import Path

import open_clip
import torch
from torch import nn

from mmcontrast.model.coca import coca_forward, init_decoder, is_coca_config
from mmcontrast.model.tower_groups import lock_towers, tower_modules
from mmcontrast.model.towers import create_tower

MAX_LOGIT_SCALE = math.log(100.0)


def resolve_clip_config(spec) -> dict:
    """An open_clip model name or an inline model config dict -> the model config dict."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise ValueError(f"model.clip: unknown open_clip model {spec!r}; see open_clip.list_models()")
    return copy.deepcopy(cfg)


def create_open_clip(model_cfg: dict, preprocess_cfg: dict | None = None, aug_cfg: dict | None = None):
    """Build through open_clip's own factory (local-dir schema) so export and training agree.

    Returns (model, train_transform, val_transform, tokenizer).
    """
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps(config))
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            f"local-dir:{tmp}", aug_cfg=aug_cfg or None
        )
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    return model, train_tf, val_tf, tokenizer


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip warns 'initialized randomly' for the weightless folder: expected here, not news."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class MultimodalModel(nn.Module):
    """Maps a batch dict {modality: tensor} to L2-normalised embeddings {modality: (b, d)}."""

    def __init__(
        self,
        clip_cfg: dict,
        extra_towers: dict | None = None,
        modalities=("image", "text"),
        image_augment=None,
    ):
        super().__init__()
        self.clip_cfg = clip_cfg
        self.modalities = list(modalities)
        self.is_coca = is_coca_config(clip_cfg)
        self.clip, self.train_transform, self.val_transform, self.tokenizer = create_open_clip(
            clip_cfg, aug_cfg=image_augment
        )
        if self.is_coca:
            init_decoder(self.clip.text_decoder)
        # DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes: keep shape (1,)
        # here and give open_clip its scalar back in open_clip_state_dict().
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1))
        if getattr(self.clip, "logit_bias", None) is not None:
            self.clip.logit_bias = nn.Parameter(self.clip.logit_bias.detach().reshape(1))
        embed_dim = clip_cfg["embed_dim"]
        self.towers = nn.ModuleDict(
            {
                m: create_tower(embed_dim, cfg)
                for m, cfg in (extra_towers or {}).items()
                if m in self.modalities
            }
        )
        self.tower_cfgs = {m: cfg for m, cfg in (extra_towers or {}).items() if m in self.modalities}
        self.locked: set[str] = set()  # towers locked whole: eval mode, no autograd
        self.frozen_norms: list[nn.Module] = []  # batch norms of locked groups: statistics kept

    def lock(self, spec: dict) -> None:
        """Lock towers, {modality: true | {options}} (see tower_groups.lock_towers)."""
        self.locked |= lock_towers(self, spec)
        self.train(self.training)

    def train(self, mode: bool = True):
        """As nn.Module.train, but locked towers and frozen norms stay in eval mode: their
        dropout is off and their batch-norm statistics do not move."""
        super().train(mode)
        for modality in self.locked:
            for module in tower_modules(self, modality):
                module.eval()
        for module in self.frozen_norms:
            module.eval()
        return self

    @property
    def embed_dim(self) -> int:
        return self.clip_cfg["embed_dim"]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute tower activations in backward (open_clip's and timm's own checkpointing)."""
        self.clip.set_grad_checkpointing(enable)
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def compile_towers(self) -> None:
        """torch.compile the image tower, the text transformer and each extra tower, in place
        (nn.Module.compile), so parameter names and checkpoints stay as they are. The glue
        between them (dicts, masks, the losses) stays eager."""
        self.clip.visual.compile()
        # CLIP keeps its text transformer as .transformer; CoCa and CustomTextCLIP as .text
        text = getattr(self.clip, "transformer", None) or self.clip.text
        text.compile()
        for tower in self.towers.values():
            tower.compile()

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 (ln 100 on the parameter) as in CLIP."""
        return self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The CLIP part as open_clip stores it: scalar logit_scale, clamped at ln(100)."""
        state = {k: v.detach().clone() for k, v in self.clip.state_dict().items()}
        state["logit_scale"] = state["logit_scale"].reshape(()).clamp(max=MAX_LOGIT_SCALE)
        if "logit_bias" in state:
            state["logit_bias"] = state["logit_bias"].reshape(())
        return state

    def logit_bias(self) -> torch.Tensor | None:
        bias = getattr(self.clip, "logit_bias", None)
        return None if bias is None else bias.reshape(())

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality in self.locked:  # nothing to train: keep no activations for a backward
            with torch.no_grad():
                return self._encode(modality, x)
        return self._encode(modality, x)

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality == "image":
            return self.clip.encode_image(x, normalize=True)
        if modality == "text":
            return self.clip.encode_text(x, normalize=True)
        return self.towers[modality](x)

    def forward(self, batch: dict, captions: bool = False, caption_chunk: int | None = None) -> dict:
        """{modality: (b, d) embedding, "logit_scale": (), "logit_bias": () if the model has
        one}; with `captions` (a CoCa model) also "caption": the (summed token NLL, token count)
        of the teacher-forced captions of samples holding both an image and a text, computed in
        chunks of `caption_chunk` tokens.

        The scale and bias are read here, inside the forward, because ZeRO-3 gathers partitioned
        parameters only while a forward runs."""
        out = {"logit_scale": self.logit_scale()}
        bias = self.logit_bias()
        if bias is not None:
            out["logit_bias"] = bias
        if captions:
            if not self.is_coca:
                raise ValueError("captions need a CoCa model: model.clip must have a multimodal_cfg")
            present = batch.get("present", {})
            valid = present["image"] & present["text"] if "image" in present and "text" in present else None
            out["image"], out["text"], nll_sum, tokens = coca_forward(
                self.clip, batch["image"], batch["text"], valid=valid, chunk=caption_chunk
            )
            out["caption"] = (nll_sum, tokens)
        for m in self.modalities:
            if m in batch and m not in out:
                out[m] = self.encode(m, batch[m])
        if "text_negatives" in batch and "text" in self.modalities:  # hard-negative captions (b, k, L)
            b, k, length = batch["text_negatives"].shape
            flat = self.encode("text", batch["text_negatives"].reshape(b * k, length))
            out["text_negatives"] = flat.reshape(b, k, -1)
        return out


def build_model(model_cfg, modalities) -> MultimodalModel:
    """From the typed ModelConfig (mmcontrast.config) and the run's modalities."""
    clip_cfg = resolve_clip_config(model_cfg.clip)
    if model_cfg.patch_dropout:  # FLIP: open_clip's PatchDropout, active in training mode only
        vision = clip_cfg["vision_cfg"]
        if isinstance(vision.get("layers"), (list, tuple)) or (
            vision.get("timm_model_name") and "vit" not in vision["timm_model_name"]
        ):
            raise ValueError(
                f"model.patch_dropout: {model_cfg.patch_dropout} needs a ViT image tower (it drops patch "
                "tokens); this model.clip's image tower is a convolutional network"
            )
        clip_cfg["vision_cfg"] = {**vision, "patch_dropout": model_cfg.patch_dropout}
    if model_cfg.init_logit_bias is not None:  # open_clip's CLIP owns the bias, as for SigLIP models
        clip_cfg["init_logit_bias"] = model_cfg.init_logit_bias
    extra = {"audio": model_cfg.audio} if model_cfg.audio is not None else {}
    model = MultimodalModel(clip_cfg, extra, modalities, image_augment=dict(model_cfg.image_augment))
    with torch.no_grad():
        model.clip.logit_scale.fill_(model_cfg.init_logit_scale)
    model.lock({m: v for m, v in model_cfg.lock.items() if m in model.modalities})
    return model
