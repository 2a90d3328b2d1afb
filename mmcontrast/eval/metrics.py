"""Pure tensor metrics: recall@k with several positives, zero-shot class embeddings.

Ties count against the query: an item is ranked below every wrong item that scores at least as
high, so a collapsed model (all embeddings equal) scores 0, not 1.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

# Queries per chunk: keeps the (queries x gallery) score block small for large val sets.
CHUNK = 1024


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of queries (rows) with a positive among the k best-scoring columns.

    scores: (q, g) similarities; positives: (q, g) bool, at least one True per row.
    """
    if scores.shape != positives.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape"
        )
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive")
    best_positive = scores.masked_fill(~positives, float("-inf")).max(dim=1).values
    rank = ((scores >= best_positive[:, None]) & ~positives).sum(dim=1)
    n = rank.shape[0]
    return {k: int((rank < k).sum()) / n for k in ks}  # exact fractions, not float32 means


def paired_recall(query: torch.Tensor, gallery: torch.Tensor, gallery_groups: torch.Tensor, ks=(1, 5)):
    """Recall@k of query i retrieving gallery item i, where gallery items of one group are equivalent.

    query, gallery: (n, d) normalised embeddings of the same n samples. gallery_groups: (n,) ids;
    items with identical inputs (e.g. the same caption twice) share an id, and retrieving any of
    them counts, since no model could tell them apart.
    """
    n = query.shape[0]
    hits = {k: 0 for k in ks}
    for start in range(0, n, CHUNK):
        q = query[start : start + CHUNK]
        rows = torch.arange(start, start + q.shape[0], device=gallery_groups.device)
        positives = gallery_groups[None, :] == gallery_groups[rows][:, None]
        for k, r in recall_at_k(q @ gallery.T, positives, ks).items():
            hits[k] += round(r * q.shape[0])
    return {k: v / n for k, v in hits.items()}


def topk_accuracy(embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor, ks=(1, 5)):
    """Zero-shot top-k accuracy: embeddings (n, d), class_embeddings (C, d), labels (n,) in [0, C)."""
    ks = [k for k in ks if k <= class_embeddings.shape[0]]
    positives = F.one_hot(labels, class_embeddings.shape[0]).bool()
    return recall_at_k(embeddings @ class_embeddings.T, positives, ks)


def class_embeddings(encode_text, tokenizer, class_names, templates, device=None) -> torch.Tensor:
    """(C, d): per class, the normalised mean of its normalised template text embeddings (as CLIP)."""
    if not templates:
        raise ValueError("zero-shot classification needs at least one template such as 'a photo of a {}.'")
    # Both "{}" (mmcontrast) and "{c}" (clip_benchmark) placeholders are accepted.
    texts = [t.format(name, c=name) for name in class_names for t in templates]
    tokens = tokenizer(texts)
    if device is not None:
        tokens = tokens.to(device)
    emb = F.normalize(encode_text(tokens).float(), dim=-1)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def row_digests(x: torch.Tensor) -> list[bytes]:
    """A content hash per row: equal inputs give equal digests (used to group duplicate items)."""
    flat = x.detach().reshape(x.shape[0], -1).cpu().contiguous()
    if flat.dtype == torch.bfloat16:  # NumPy has no bfloat16; hash the same bits as int16
        flat = flat.view(torch.int16)
    flat = flat.numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]
