"""Zero-shot classification and any-to-any retrieval over a single pass of eval batches.

Works with anything that has `.encode(modality, x)`, `.modalities`, `.embed_dim` and `.tokenizer`:
the training-time MultimodalModel and the ExportedModel alike, so the numbers logged during
training and those of `mmcontrast eval` on an export come from the same code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations

import torch

from mmcontrast.config import MODALITIES
from mmcontrast.eval.composition import composition_choices, composition_metrics
from mmcontrast.eval.metrics import (
    CHUNK,
    class_embeddings,
    paired_recall,
    recall_at_k,
    row_digests,
    topk_accuracy,
)
from mmcontrast.losses.gram import gram_volume

KS = (1, 5)


@dataclass
class EvalSet:
    """Embeddings of every eval sample, aligned by row across modalities."""

    embeddings: dict[str, torch.Tensor]  # modality -> (N, d); zero rows where absent
    present: dict[str, torch.Tensor]  # modality -> (N,) bool
    groups: dict[str, torch.Tensor]  # modality -> (N,) id shared by rows with identical inputs
    labels: torch.Tensor  # (N,) zero-shot class index, -1 when not a known single-object sample
    keys: list[str]
    captions: list[str] = field(default_factory=list)  # generated, for samples with image and meta
    caption_metas: list[dict] = field(default_factory=list)
    composition: list[tuple[str, bool]] = field(default_factory=list)  # (category, true caption won)


def _parse_meta(meta):
    return json.loads(meta) if isinstance(meta, (bytes, str)) else meta


def single_object_label(meta, class_names: list[str]) -> int:
    """Class index of a sample whose metadata lists exactly one object, else -1."""
    meta = _parse_meta(meta)
    objects = (meta or {}).get("objects") or []
    if len(objects) != 1:
        return -1
    name = f"{objects[0].get('color')} {objects[0].get('shape')}"
    return class_names.index(name) if name in class_names else -1


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_float_dtype(model) -> torch.dtype:
    """The dtype floating inputs must take: bf16 for a DeepSpeed bf16 module, as in training."""
    return next(model.parameters()).dtype


def _batch_size(batch: dict, modalities: list[str]) -> int:
    if "__key__" in batch:
        return len(batch["__key__"])
    for m in modalities:
        if m in batch:
            return batch[m].shape[0]
    raise ValueError(f"an eval batch has none of the modalities {modalities} and no __key__")


@torch.no_grad()
def collect(model, batches: Iterable[dict], class_names: list[str], caption_fn=None) -> EvalSet:
    """Encode every present item of every batch; one pass, so streaming loaders work.

    caption_fn(images) -> captions, when given, captions every image that has metadata.
    """
    modalities = [m for m in MODALITIES if m in model.modalities]
    device, float_dtype = model_device(model), model_float_dtype(model)
    parts = {m: [] for m in modalities}
    present = {m: [] for m in modalities}
    digests = {m: [] for m in modalities}
    labels, keys, captions, caption_metas, composition = [], [], [], [], []
    for batch in batches:
        n = _batch_size(batch, modalities)
        masks = batch.get("present", {})
        for m in modalities:
            x = batch.get(m)
            mask = (
                torch.zeros(n, dtype=torch.bool)
                if x is None
                else masks.get(m, torch.ones(n, dtype=torch.bool))
            )
            mask = mask.bool().cpu()
            emb = torch.zeros(n, model.embed_dim)
            row_digest = [b""] * n
            if mask.any():
                rows = x[mask]
                inputs = rows.to(device, dtype=float_dtype if rows.is_floating_point() else None)
                emb[mask] = model.encode(m, inputs).float().cpu()
                for i, d in zip(mask.nonzero().flatten().tolist(), row_digests(rows), strict=True):
                    row_digest[i] = d
            parts[m].append(emb)
            present[m].append(mask)
            digests[m].extend(row_digest)
        metas = batch.get("meta") or [None] * n
        batch_keys = list(batch.get("__key__") or [f"{len(keys) + i}" for i in range(n)])
        labels.extend(single_object_label(meta, class_names) for meta in metas)
        image_rows = present["image"][-1].nonzero().flatten().tolist() if "image" in present else []
        if "text" in present and batch.get("meta"):
            rows = image_rows
            composition += composition_choices(
                model,
                parts["image"][-1][rows].to(device),
                [_parse_meta(metas[i]) for i in rows],
                [batch_keys[i] for i in rows],
            )
        if caption_fn is not None and "image" in batch:
            rows = [i for i in image_rows if metas[i] is not None]
            if rows:
                images = batch["image"][rows].to(device, dtype=float_dtype)
                captions.extend(caption_fn(images))
                caption_metas.extend(_parse_meta(metas[i]) for i in rows)
        keys.extend(batch_keys)
    if not keys:
        raise ValueError("no eval batches: the eval data is empty")
    groups = {}
    for m in modalities:
        ids: dict[bytes, int] = {}
        groups[m] = torch.tensor([ids.setdefault(d, len(ids)) for d in digests[m]], dtype=torch.long)
    return EvalSet(
        embeddings={m: torch.cat(parts[m]) for m in modalities},
        present={m: torch.cat(present[m]) for m in modalities},
        groups=groups,
        labels=torch.tensor(labels, dtype=torch.long),
        keys=keys,
        captions=captions,
        caption_metas=caption_metas,
        composition=composition,
    )


def metrics_from(data: EvalSet, class_emb: torch.Tensor | None, ks=KS) -> dict:
    """Zero-shot top-k per non-text modality and recall@k both ways for every modality pair."""
    metrics: dict = {}
    modalities = list(data.embeddings)
    if class_emb is not None:
        for m in modalities:
            if m == "text":
                continue
            rows = data.present[m] & (data.labels >= 0)
            metrics[f"zeroshot/{m}/n"] = int(rows.sum())
            if rows.any():
                for k, v in topk_accuracy(data.embeddings[m][rows], class_emb, data.labels[rows], ks).items():
                    metrics[f"zeroshot/{m}/top{k}"] = v
    for a, b in combinations(modalities, 2):
        rows = data.present[a] & data.present[b]
        metrics[f"retrieval/{a}-{b}/n"] = int(rows.sum())
        if not rows.any():
            continue
        ea, eb = data.embeddings[a][rows], data.embeddings[b][rows]
        for src, dst, q, g in ((a, b, ea, eb), (b, a, eb, ea)):
            for k, v in paired_recall(q, g, data.groups[dst][rows], ks).items():
                metrics[f"retrieval/{src}->{dst}/R@{k}"] = v
    if {"image", "text", "audio"} <= set(modalities):
        metrics.update(higher_order_metrics(data, class_emb, ks))
    return metrics


def _gram_scores(text: torch.Tensor, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    return -gram_volume(text, image, audio)


def _mip_scores(text: torch.Tensor, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    return text @ (image * audio).T


# How a text scores an (image, audio) pair: GRAM's negative volume and Symile's multilinear product.
TRIMODAL_SCORES = {"gram": _gram_scores, "mip": _mip_scores}


def higher_order_metrics(data: EvalSet, class_emb: torch.Tensor | None, ks=KS) -> dict:
    """Tri-modal scores: classify from image + audio together, and retrieve the (image, audio)
    pair of a caption, ranking by -volume (GRAM) and by the multilinear inner product (Symile)."""
    metrics: dict = {}
    both = data.present["image"] & data.present["audio"]
    for name, score in TRIMODAL_SCORES.items():
        if class_emb is not None:
            rows = both & (data.labels >= 0)
            if rows.any():
                scores = score(class_emb, data.embeddings["image"][rows], data.embeddings["audio"][rows]).T
                positives = torch.nn.functional.one_hot(data.labels[rows], class_emb.shape[0]).bool()
                for k, v in recall_at_k(
                    scores, positives, [k for k in ks if k <= class_emb.shape[0]]
                ).items():
                    metrics[f"zeroshot/image+audio/{name}/top{k}"] = v
        rows = both & data.present["text"]
        if rows.any():
            # an (image, audio) pair is identified by both of its inputs' groups
            pair_group = (
                data.groups["image"][rows] * (int(data.groups["audio"].max()) + 1)
                + data.groups["audio"][rows]
            )
            text, image, audio = (data.embeddings[m][rows] for m in ("text", "image", "audio"))
            hits = {k: 0 for k in ks}
            for start in range(0, text.shape[0], CHUNK):
                stop = min(start + CHUNK, text.shape[0])
                positives = pair_group[None, :] == pair_group[start:stop, None]
                for k, v in recall_at_k(score(text[start:stop], image, audio), positives, ks).items():
                    hits[k] += round(v * (stop - start))
            for k, v in hits.items():
                metrics[f"retrieval/text->(image,audio)/{name}/R@{k}"] = v / text.shape[0]
    return metrics


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[dict],
    templates: list[str],
    class_names: list[str],
    ks=KS,
    caption_strategy: str = "",
) -> dict:
    """Metrics dict (fractions in [0, 1] and sample counts) for `model` on one pass of `batches`.

    Keys: "zeroshot/<modality>/top1|top5|n" over single-object samples, and
    "retrieval/<a>-><b>/R@1|R@5" plus "retrieval/<a>-<b>/n" over samples holding both modalities.
    With a caption_strategy and a CoCa model, also "caption/single_object|two_object[/n]": how
    often the generated caption names each object's colour and shape (see eval.captions).
    The model is put in eval mode (BatchNorm running stats) and restored afterwards.
    """
    was_training = model.training
    model.eval()
    caption_fn = None
    if caption_strategy and hasattr(model.clip, "text_decoder"):
        from mmcontrast.eval.captions import generate_captions

        def caption_fn(images):
            return generate_captions(model.clip, images, caption_strategy)

    try:
        data = collect(model, batches, list(class_names), caption_fn)
        class_emb = None
        if "text" in model.modalities and class_names and templates:
            class_emb = class_embeddings(
                lambda tokens: model.encode("text", tokens),
                model.tokenizer,
                list(class_names),
                list(templates),
                model_device(model),
            ).cpu()
        metrics = metrics_from(data, class_emb, ks)
        metrics.update(composition_metrics(data.composition))
        if data.captions:
            from mmcontrast.eval.captions import caption_metrics

            metrics.update(caption_metrics(data.captions, data.caption_metas))
        return metrics
    finally:
        model.train(was_training)
