"""DeGLA-style local contrasts against a sample's own negative captions, and self-distillation.

("Decoupled Global-Local Alignment for Improving Compositional Understanding".) Shapes: image,
text (n, d) and negatives (n, k, d) of this rank, L2-normalised; teacher_* the same from a frozen
EMA copy of the model (no gradient); negatives_valid (n, k). Each returns this rank's share of
the mean over every rank's counted samples, times the world size (as info_nce).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcontrast.losses.gather import share_of_global_mean


def _global_mean(per_sample: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # where, not boolean indexing: no host read of the mask
    return share_of_global_mean(torch.where(rows, per_sample, 0.0).sum(), rows.sum())


def _own_negatives_ce(query, positive, negatives, logit_scale, rows, negatives_valid):
    """Cross-entropy of each query over [its positive, its k negatives], positive first."""
    pos = (query * positive).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", query, negatives).masked_fill(~negatives_valid, float("-inf"))
    logits = logit_scale * torch.cat([pos, neg], 1).float()
    per_sample = F.cross_entropy(
        logits, torch.zeros(len(query), dtype=torch.long, device=query.device), reduction="none"
    )
    return _global_mean(per_sample, rows)


def image_grounded_contrast(image, text, negatives, logit_scale, *, valid, negatives_valid):
    """Each image against its own caption (the positive) and that caption's negatives.
    Samples with no valid negative are not counted."""
    rows = valid & negatives_valid.any(1)
    return _own_negatives_ce(image, text, negatives, logit_scale, rows, negatives_valid)


def text_grounded_contrast(text, teacher_text, teacher_negatives, logit_scale, *, valid, negatives_valid):
    """Each caption against the teacher's embedding of itself (the positive) and the teacher's
    embeddings of its negatives: the student must keep a caption apart from its rewrites."""
    rows = valid & negatives_valid.any(1)
    return _own_negatives_ce(
        text, teacher_text.detach(), teacher_negatives.detach(), logit_scale, rows, negatives_valid
    )


def distillation(student, teacher, *, valid):
    """Mean 1 - cosine between the student's and the frozen teacher's embeddings."""
    per_sample = 1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)
    return _global_mean(per_sample, valid)
