"""Objective terms as registered builders, and the weighted sum over them."""

from __future__ import annotations

import torch

from mmcontrast.losses.gram import gram_loss
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
    """Weighted sum of configured terms. Call -> (total loss, {"term/a-b": unweighted value})."""

    def __init__(self, terms: list[tuple[str, float, dict[str, float], object]]):
        self.terms = terms  # (name, term weight, {"a-b": pair weight}, term callable)

    @classmethod
    def from_config(cls, loss_cfg, modalities) -> Objective:
        from mmcontrast.config import resolve_weighted_pairs

        built = []
        for t in loss_cfg.terms:
            pairs = resolve_weighted_pairs(t.pairs, modalities)
            term = TERMS[t.name]([(a, b) for a, b, _ in pairs], **t.options)
            built.append((t.name, t.weight, {f"{a}-{b}": w for a, b, w in pairs}, term))
        return cls(built)

    def __call__(self, embeddings, present, logit_scale, logit_bias=None):
        total, logged = 0.0, {}
        for name, weight, pair_weights, term in self.terms:
            for part, value in term(embeddings, present, logit_scale, logit_bias).items():
                total = total + weight * pair_weights.get(part, 1.0) * value
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
