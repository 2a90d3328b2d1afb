"""One function per benchmark task: embeddings (or captions) in, metrics out. No I/O, no model.

Embeddings are L2-normalised rows; n samples, d dims. Keys are relative to the benchmark.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from mmcontrast.eval.metrics import chunked_recall, hit_ranks
from mmcontrast.losses.gram import gram_volume


def classification(emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, ks=(1, 5)) -> dict:
    """emb (n, d), labels (n,) in [0, C), class_emb (C, d) -> top-k and mean per-class recall.

    mean_per_class_recall averages top-1 recall over the classes that have samples.
    """
    return _from_scores(emb @ class_emb.T, labels, ks)


def _from_scores(scores: torch.Tensor, labels: torch.Tensor, ks) -> dict:
    positives = torch.nn.functional.one_hot(labels, scores.shape[1]).bool()
    rank = hit_ranks(scores, positives)
    out = {f"top{k}": int((rank < k).sum()) / len(labels) for k in ks if k <= scores.shape[1]}
    hit = (rank < 1).double()  # exact fractions: float32 would round 5/6
    per_class = torch.zeros(scores.shape[1], dtype=torch.float64).index_add_(0, labels, hit)
    counts = torch.bincount(labels, minlength=scores.shape[1])
    seen = counts > 0
    out["mean_per_class_recall"] = float((per_class[seen] / counts[seen]).mean())
    out["n"] = len(labels)
    return out


def retrieval(media: torch.Tensor, text: torch.Tensor, pairs: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """media (n, d), text (t, d), pairs (p, 2) of (sample, text) positives, every row of both
    sides in some pair -> {"media->text": {k: R@k}, "text->media": {k: R@k}}."""
    positive = torch.zeros(media.shape[0], text.shape[0], dtype=torch.bool)
    positive[pairs[:, 0], pairs[:, 1]] = True
    return {
        "media->text": chunked_recall(media, text, lambda a, b: positive[a:b], ks),
        "text->media": chunked_recall(text, media, lambda a, b: positive.T[a:b], ks),
    }


def composition(
    media: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, owner: torch.Tensor, categories
) -> dict:
    """media (n, d) and its true caption positive (n, d); negatives (m, d) belong to sample
    owner (m,). A sample is right when its positive outscores every one of its negatives (a tie
    or a NaN is wrong). -> {category: accuracy, category/n: count}."""
    true_score = (media * positive).sum(-1)
    negative_score = (media[owner] * negatives).sum(-1)
    beaten = ~(true_score[owner] > negative_score)  # NaN compares False: beaten
    losses = torch.zeros(media.shape[0]).index_add_(0, owner, beaten.float())
    right = (losses == 0) & torch.isfinite(true_score)
    hits, counts = Counter(), Counter()
    for category, ok in zip(categories, right.tolist(), strict=True):
        counts[category] += 1
        hits[category] += ok
    out = {}
    for category in sorted(counts):
        out[category] = hits[category] / counts[category]
        out[f"{category}/n"] = counts[category]
    return out


def _gram_scores(text: torch.Tensor, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    return -gram_volume(text, image, audio)


def _mip_scores(text: torch.Tensor, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    return text @ (image * audio).T


# How a text scores an (image, audio) pair: GRAM's negative volume and Symile's multilinear product.
TRIMODAL_SCORES = {"gram": _gram_scores, "mip": _mip_scores}


def trimodal_classification(
    image: torch.Tensor, audio: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, ks=(1, 5)
) -> dict:
    """Classify from image and audio together: {score name: classification metrics}."""
    return {
        name: _from_scores(score(class_emb, image, audio).T, labels, ks)
        for name, score in TRIMODAL_SCORES.items()
    }


def trimodal_retrieval(
    image: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, pairs: torch.Tensor, ks=(1, 5, 10)
) -> dict:
    """Retrieve the (image, audio) sample of a caption: {score name: {k: R@k}}."""
    positive = torch.zeros(text.shape[0], image.shape[0], dtype=torch.bool)
    positive[pairs[:, 1], pairs[:, 0]] = True
    out = {}
    for name, score in TRIMODAL_SCORES.items():
        hits = {k: 0 for k in ks}
        for start in range(0, text.shape[0], 256):
            stop = min(start + 256, text.shape[0])
            rank = hit_ranks(score(text[start:stop], image, audio), positive[start:stop])
            for k in ks:
                hits[k] += int((rank < k).sum())
        out[name] = {k: v / text.shape[0] for k, v in hits.items()}
    return out


def mentioned_classes(caption: str, classnames: list[str]) -> Counter:
    """The class names a caption names, as whole words, longest match first, case-insensitive."""
    names = sorted(classnames, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(n.lower()) for n in names) + r")\b")
    return Counter(pattern.findall(caption.lower()))


def captioning(captions: list[str], mentions: list[list[str]], categories: list[str], classnames) -> dict:
    """A generated caption is right when it names exactly the sample's class names (as a multiset):
    every one, and no other class. -> {category: accuracy, category/n: count}."""
    hits, counts = Counter(), Counter()
    for caption, want, category in zip(captions, mentions, categories, strict=True):
        counts[category] += 1
        hits[category] += mentioned_classes(caption, classnames) == Counter(m.lower() for m in want)
    out = {}
    for category in sorted(counts):
        out[category] = hits[category] / counts[category]
        out[f"{category}/n"] = counts[category]
    return out
