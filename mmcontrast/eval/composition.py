"""A SugarCrepe-style compositional test on demo-world metadata: for each image, is its true
caption scored above a hard negative of each category (swap_att, swap_obj, replace_att,
replace_obj, replace_rel)? A two-way choice per (sample, category); chance is 50%."""

from __future__ import annotations

from collections import Counter

import torch

from mmcontrast.data.demo import render_caption
from mmcontrast.data.negatives import DEMO_CATEGORIES, demo_negatives, sample_rng


def composition_choices(
    model, image_emb: torch.Tensor, metas: list[dict], keys: list[str]
) -> list[tuple[str, bool]]:
    """[(category, true caption wins)] for image embeddings (n, d) of samples with metadata.

    Negatives are drawn with a generator seeded by the sample key, so every run and every model
    faces the same test.
    """
    texts, rows = [], []  # rows: (image row, category or None for the truth, index of its truth)
    for row, (meta, key) in enumerate(zip(metas, keys, strict=True)):
        if not meta or "caption_template" not in meta:
            continue
        truth_index = len(texts)
        texts.append(render_caption(meta["caption_template"], meta["objects"]))
        for category, negative in demo_negatives(meta, sample_rng(key)).items():
            rows.append((row, category, truth_index, len(texts)))
            texts.append(negative)
    if not rows:
        return []
    device = image_emb.device
    text_emb = model.encode("text", model.tokenizer(texts).to(device)).float()
    out = []
    for row, category, truth, negative in rows:
        true_score = image_emb[row] @ text_emb[truth]
        out.append((category, bool(true_score > image_emb[row] @ text_emb[negative])))
    return out


def composition_metrics(choices: list[tuple[str, bool]]) -> dict:
    """ "composition/<category>" accuracy and "composition/<category>/n" per category."""
    hits, counts = Counter(), Counter()
    for category, won in choices:
        counts[category] += 1
        hits[category] += won
    metrics = {}
    for category in DEMO_CATEGORIES:
        if counts[category]:
            metrics[f"composition/{category}"] = hits[category] / counts[category]
            metrics[f"composition/{category}/n"] = counts[category]
    return metrics
