"""Objective terms as registered builders, and the weighted sum over them."""

from __future__ import annotations

import torch

from mmcontrast.losses.caption import caption_loss
from mmcontrast.losses.degla import distillation, image_grounded_contrast, text_grounded_contrast
from mmcontrast.losses.gather import GatherScope
from mmcontrast.losses.gram import gram_loss
from mmcontrast.losses.hard_negatives import hard_negative_mixing, hard_negative_nce, negclip
from mmcontrast.losses.info_nce import info_nce
from mmcontrast.losses.registry import TERMS, register_term
from mmcontrast.losses.siglip import siglip
from mmcontrast.losses.symile import symile_loss


@register_term("info_nce")
def info_nce_term(pairs, label_smoothing: float = 0.0, tile: int | None = None):
    """InfoNCE over each modality pair; a pair's samples are those holding both modalities."""

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        return {
            f"{a}-{b}": info_nce(
                embeddings[a],
                embeddings[b],
                logit_scale,
                valid=present[a] & present[b],
                label_smoothing=label_smoothing,
                tile=tile,
            )
            for a, b in pairs
        }

    return term


@register_term("siglip")
def siglip_term(pairs, tile: int | None = None):
    """SigLIP over each modality pair, with the model's learnable logit bias."""

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        return {
            f"{a}-{b}": siglip(
                embeddings[a],
                embeddings[b],
                logit_scale,
                logit_bias,
                valid=present[a] & present[b],
                tile=tile,
            )
            for a, b in pairs
        }

    return term


class Objective:
    """Weighted sum of configured terms. Call -> (total loss, {"term/a-b": unweighted value}).

    `forward_kwargs` are what the terms need from the model's forward beyond embeddings (the
    caption term asks for the decoder's token NLL); pass them to the model's forward.
    """

    def __init__(self, terms: list[tuple[str, float, dict[str, float], object]]):
        self.terms = terms  # (name, term weight, {"a-b": pair weight}, term callable)
        self.forward_kwargs = {}
        # EMA decay of a teacher model the trainer must keep (None: no term needs one); the
        # teacher's embeddings reach the terms as embeddings["teacher"]
        self.teacher_decay = None
        for _, _, _, term in terms:
            self.forward_kwargs.update(getattr(term, "forward_kwargs", {}))
            if getattr(term, "teacher_decay", None) is not None:
                self.teacher_decay = term.teacher_decay

    @classmethod
    def from_config(cls, loss_cfg, modalities) -> Objective:
        from mmcontrast.config import resolve_weighted_pairs

        built = []
        for t in loss_cfg.terms:
            pairs = resolve_weighted_pairs(t.pairs, modalities)
            term = TERMS[t.name]([(a, b) for a, b, _ in pairs], **t.options)
            built.append((t.name, t.weight, {f"{a}-{b}": w for a, b, w in pairs}, term))
        return cls(built)

    def __call__(self, embeddings, present, logit_scale, logit_bias=None, *, equal_rows: bool = False):
        """equal_rows: every rank holds as many samples as this one (the trainer's full batches),
        so the gathers exchange no sizes. Each modality is gathered once, whatever number of
        terms and pairs use it."""
        total, logged = 0.0, {}
        with GatherScope(equal_rows=equal_rows):
            for name, weight, pair_weights, term in self.terms:
                part_weights = getattr(term, "part_weights", {})
                for part, value in term(embeddings, present, logit_scale, logit_bias).items():
                    total = total + weight * pair_weights.get(part, 1.0) * part_weights.get(part, 1.0) * value
                    logged[f"{name}/{part}"] = value.detach()
        return total, logged


def _all_present(present: dict, modalities) -> torch.Tensor:
    mask = None
    for m in modalities:
        mask = present[m] if mask is None else mask & present[m]
    return mask


@register_term("gram")
def gram_term(pairs, anchor: str = "text", label_smoothing: float = 0.1, tile: int | None = None):
    """GRAM volume loss: the anchor against the tuple of every other modality of the pairs.

    Samples lacking any of the modalities are masked out (row and column); temperature is
    1 / logit_scale, the model's one learnable scale.
    """
    modalities = sorted({m for p in pairs for m in p}, key=lambda m: ("image", "text", "audio").index(m))
    others = [m for m in modalities if m != anchor]

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        valid = _all_present(present, [anchor, *others])
        loss = gram_loss(
            embeddings[anchor],
            [embeddings[m] for m in others],
            1.0 / logit_scale,
            label_smoothing=label_smoothing,
            valid=valid,
            tile=tile,
        )
        return {f"{anchor}-{'+'.join(others)}": loss}

    return term


@register_term("symile")
def symile_term(pairs, negatives: str = "n", label_smoothing: float = 0.0, tile: int | None = None):
    """Symile over every modality named in the pairs: each in turn is the anchor of the MIP.

    Samples lacking any of them are masked out (rows and columns), not given a learned stand-in.
    """
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"symile negatives must be 'n' or 'n_squared', got {negatives!r}")
    modalities = sorted({m for p in pairs for m in p}, key=lambda m: ("image", "text", "audio").index(m))

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        loss = symile_loss(
            [embeddings[m] for m in modalities],
            logit_scale,
            negatives=negatives,
            valid=_all_present(present, modalities),
            label_smoothing=label_smoothing,
            tile=tile,
        )
        return {"+".join(modalities): loss}

    return term


@register_term("caption")
def caption_term(pairs, chunk: int | None = None):
    """CoCa's captioning loss: image -> text next-token cross-entropy, padding ignored.

    The model's forward computes the token NLL (its decoder's output projection is used there, in
    chunks of `chunk` tokens, so ZeRO-3 has it gathered); this term turns it into the mean over
    every rank's caption tokens. Paper weights: contrastive 1, caption 2.
    """
    if ("image", "text") not in [tuple(p) for p in pairs]:
        raise ValueError(
            f"the caption term reads images and writes text: pairs must hold [image, text], got {pairs}"
        )

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        if "caption" not in embeddings:
            raise ValueError("the caption term needs the model's forward(..., captions=True) output")
        return {"image-text": caption_loss(*embeddings["caption"])}

    term.forward_kwargs = {"captions": True, "caption_chunk": chunk}
    return term


def _negatives_of(embeddings, present):
    if "text_negatives" not in embeddings:
        raise ValueError("this term needs negative captions: set data.negatives (shard, demo or rules)")
    return embeddings["text_negatives"], present["text_negatives"]


@register_term("negclip")
def negclip_term(pairs, tile: int | None = None):
    """NegCLIP: each sample's negative captions join every rank's captions as extra
    image -> text columns (data.negatives provides them)."""
    if ("image", "text") not in [tuple(p) for p in pairs]:
        raise ValueError(
            f"negclip contrasts images with captions: pairs must hold [image, text], got {pairs}"
        )

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        negatives, negatives_valid = _negatives_of(embeddings, present)
        loss = negclip(
            embeddings["image"],
            embeddings["text"],
            negatives,
            logit_scale,
            valid=present["image"] & present["text"],
            negatives_valid=negatives_valid,
            tile=tile,
        )
        return {"image-text": loss}

    return term


def _pairwise(pairs, loss_fn, **options):
    """A term applying loss_fn(a, b, logit_scale, valid=..., **options) to each pair."""

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        return {
            f"{a}-{b}": loss_fn(
                embeddings[a], embeddings[b], logit_scale, valid=present[a] & present[b], **options
            )
            for a, b in pairs
        }

    return term


@register_term("hard_negative")
def hard_negative_term(pairs, beta: float = 1.0, tau_plus: float = 0.0, tile: int | None = None):
    """InfoNCE with hard in-batch negatives up-weighted (exp(beta * score)) and debiased
    (class prior tau_plus) over the gathered global batch, for each pair."""
    return _pairwise(pairs, hard_negative_nce, beta=beta, tau_plus=tau_plus, tile=tile)


@register_term("hard_negative_mixing")
def hard_negative_mixing_term(
    pairs, n_hard: int = 16, n_mix: int = 16, n_self: int = 8, tile: int | None = None
):
    """InfoNCE plus synthetic negatives mixed from each row's n_hard hardest gathered negatives
    (n_mix pairwise mixes, n_self mixes with the query itself), for each pair."""
    return _pairwise(pairs, hard_negative_mixing, n_hard=n_hard, n_mix=n_mix, n_self=n_self, tile=tile)


@register_term("degla")
def degla_term(
    pairs, image_grounded: float = 1.0, text_grounded: float = 1.0, distill: float = 1.0, ema: float = 0.999
):
    """DeGLA-style: an image-grounded contrast (each image vs its caption and that caption's
    negatives), a text-grounded contrast (each caption vs an EMA teacher's embeddings of itself
    and of its negatives) and self-distillation of the image and text embeddings to the teacher,
    which keeps general ability. Weights per part; `ema` is the teacher's decay."""
    if ("image", "text") not in [tuple(p) for p in pairs]:
        raise ValueError(f"degla contrasts images with captions: pairs must hold [image, text], got {pairs}")
    if not 0.0 < ema < 1.0:
        raise ValueError(f"degla ema must be in (0, 1), got {ema}")

    def term(embeddings, present, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        teacher = embeddings.get("teacher")
        if teacher is None:
            raise ValueError(
                "the degla term needs the trainer's EMA teacher embeddings (embeddings['teacher'])"
            )
        negatives, negatives_valid = _negatives_of(embeddings, present)
        valid = present["image"] & present["text"]
        return {
            "image_grounded": image_grounded_contrast(
                embeddings["image"],
                embeddings["text"],
                negatives,
                logit_scale,
                valid=valid,
                negatives_valid=negatives_valid,
            ),
            "text_grounded": text_grounded_contrast(
                embeddings["text"],
                teacher["text"],
                teacher["text_negatives"],
                logit_scale,
                valid=valid,
                negatives_valid=negatives_valid,
            ),
            "distill": 0.5
            * sum(distillation(embeddings[m], teacher[m], valid=present[m]) for m in ("image", "text")),
        }

    term.part_weights = {"image_grounded": image_grounded, "text_grounded": text_grounded, "distill": distill}
    term.teacher_decay = ema
    return term
