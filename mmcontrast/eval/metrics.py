"""Pure tensor metrics: recall@k with several positives, zero-shot class embeddings.

Ties count against the query: an item is ranked below every wrong item that scores at least as
high, so a collapsed model (all embeddings equal) scores 0, not 1. A non-finite score is never a
hit: a NaN positive is a miss and a NaN negative outranks the positive, so a NaN model scores 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Queries per chunk: keeps the (queries x gallery) score block small for large sets.
CHUNK = 1024
# Texts per forward when building class embeddings: 1,000 classes x 80 templates fit in memory.
TEXT_CHUNK = 1024


def hit_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(q,) rank of each query's best positive among the negatives; inf where no finite positive.

    scores: (q, g) similarities; positives: (q, g) bool, at least one True per row.
    """
    if scores.shape != positives.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape"
        )
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive")
    finite = torch.isfinite(scores)
    best_positive = scores.masked_fill(~positives | ~finite, float("-inf")).max(dim=1).values
    beaten = ((scores >= best_positive[:, None]) | ~finite) & ~positives
    rank = beaten.sum(dim=1).float()
    return rank.masked_fill(~torch.isfinite(best_positive), float("inf"))


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of queries (rows) with a positive among the k best-scoring columns."""
    rank = hit_ranks(scores, positives)
    n = rank.shape[0]
    return {k: int((rank < k).sum()) / n for k in ks}  # exact fractions, not float32 means


def chunked_recall(query: torch.Tensor, gallery: torch.Tensor, positives_of, ks=(1, 5)) -> dict[int, float]:
    """recall_at_k of query rows against gallery rows without the whole (q, g) score matrix.

    positives_of(start, stop) -> (stop - start, g) bool positives of those queries.
    """
    n = query.shape[0]
    hits = {k: 0 for k in ks}
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        rank = hit_ranks(query[start:stop] @ gallery.T, positives_of(start, stop))
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: v / n for k, v in hits.items()}


def class_embeddings(encode_text, tokenizer, class_names, templates, device=None) -> torch.Tensor:
    """(C, d): per class, the normalised mean of its normalised template text embeddings (as CLIP).

    Texts are encoded TEXT_CHUNK at a time, whole classes per chunk.
    """
    if not templates:
        raise ValueError("zero-shot classification needs at least one template such as 'a photo of a {c}.'")
    per_chunk = max(1, TEXT_CHUNK // len(templates))
    out = []
    for start in range(0, len(class_names), per_chunk):
        names = class_names[start : start + per_chunk]
        # Both "{}" (mmcontrast) and "{c}" (clip_benchmark) placeholders are accepted.
        tokens = tokenizer([t.format(name, c=name) for name in names for t in templates])
        if device is not None:
            tokens = tokens.to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1)
        out.append(F.normalize(emb.view(len(names), len(templates), -1).mean(dim=1), dim=-1))
    return torch.cat(out)
