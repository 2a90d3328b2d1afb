"""Objective terms as registered builders, and the weighted sum over them."""

from __future__ import annotations

import torch

from mmcontrast.losses.info_nce import info_nce
from mmcontrast.losses.registry import TERMS, register_term


@register_term("info_nce")
def info_nce_term(pairs, label_smoothing: float = 0.0):
    """InfoNCE over each modality pair; a pair's samples are those holding both modalities."""

    def term(embeddings: dict, present: dict, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {}
        for a, b in pairs:
            valid = present[a] & present[b]
            parts[f"{a}-{b}"] = info_nce(
                embeddings[a], embeddings[b], logit_scale, valid=valid, label_smoothing=label_smoothing
            )
        return parts

    return term


class Objective:
    """Weighted sum of configured terms. Call -> (total loss, {"term/pair": value})."""

    def __init__(self, terms: list[tuple[str, float, object]]):
        self.terms = terms  # (name, weight, term callable)

    @classmethod
    def from_config(cls, loss_cfg, modalities) -> Objective:
        from mmcontrast.config import resolve_pairs

        built = []
        for t in loss_cfg.terms:
            built.append((t.name, t.weight, TERMS[t.name](resolve_pairs(t.pairs, modalities))))
        return cls(built)

    def __call__(self, embeddings, present, logit_scale):
        total, logged = 0.0, {}
        for name, weight, term in self.terms:
            for part, value in term(embeddings, present, logit_scale).items():
                total = total + weight * value / 1.0
                logged[f"{name}/{part}"] = value.detach()
        return total, logged
