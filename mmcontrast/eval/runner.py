"""Evaluate a model on benchmark folders, the work split over every rank.

Each rank decodes and encodes its share of every benchmark (whole shards, or every world-th
sample; see benchmark.decoded_share) and of the texts (class prompts, captions: text j goes to
rank j % world); the embeddings are gathered, put back in sample order and
every rank computes the same metrics with the task functions of mmcontrast.eval.tasks. Works with
anything that has `.encode(modality, x)`, `.modalities`, `.embed_dim` and `.tokenizer`: the
training-time MultimodalModel and the ExportedModel alike.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcontrast import faults
from mmcontrast.config import MODALITIES
from mmcontrast.eval import tasks
from mmcontrast.eval.benchmark import Benchmark, BenchmarkError, Decoder, decoded_share, detect_modalities
from mmcontrast.eval.metrics import TEXT_CHUNK, class_embeddings
from mmcontrast.losses.gather import gather_rows, world_info

log = logging.getLogger(__name__)

CLASSIFICATION_KS = (1, 5)
RETRIEVAL_KS = (1, 5, 10)


# ---------------------------------------------------------------- collectives (no-ops alone)


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _gather_strided(local: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Rows split as j -> rank j % world, gathered (on local's device) and back in j order."""
    gathered, _ = gather_rows(local, with_grad=False)  # rank-major
    order = torch.tensor([j for r in range(world) for j in range(r, total, world)], device=gathered.device)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


# ---------------------------------------------------------------- encoding


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_float_dtype(model) -> torch.dtype:
    """The dtype floating inputs must take: bf16 for a DeepSpeed bf16 module, as in training."""
    return next(model.parameters()).dtype


class _Batcher:
    """Stacks inputs into batches of batch_size and applies fn to each batch on the model's device."""

    def __init__(self, fn: Callable, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.fn, self.batch_size, self.device, self.dtype = fn, batch_size, device, dtype
        self.pending: list[torch.Tensor] = []
        self.results: list = []

    def add(self, x: torch.Tensor) -> None:
        self.pending.append(x)
        if len(self.pending) == self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        x = torch.stack(self.pending)
        self.pending = []
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, dtype=self.dtype if x.is_floating_point() else None, non_blocking=True)
        self.results.append(self.fn(x))

    def finish(self) -> list:
        self._flush()
        return self.results


def _encode_texts(model, texts: list[str], rank: int, world: int) -> torch.Tensor:
    """(len(texts), d) normalised text embeddings; rank r encodes texts r, r + world, ..."""
    device = model_device(model)
    mine = texts[rank::world]
    parts = [
        model.encode("text", model.tokenizer(mine[i : i + TEXT_CHUNK]).to(device)).float()
        for i in range(0, len(mine), TEXT_CHUNK)
    ]
    local = torch.cat(parts) if parts else torch.zeros(0, model.embed_dim, device=device)
    return _gather_strided(local, len(texts), world)


def _class_embeddings(model, bench: Benchmark, rank: int, world: int) -> torch.Tensor:
    """(C, d) zero-shot classifier; rank r builds classes r, r + world, ..."""
    device = model_device(model)
    names = bench.classnames[rank::world]
    if names:
        local = class_embeddings(
            lambda t: model.encode("text", t), model.tokenizer, names, bench.templates, device
        )
    else:
        local = torch.zeros(0, model.embed_dim, device=device)
    return _gather_strided(local, len(bench.classnames), world)


class _Share(IterableDataset):
    """This rank's decoded samples; DataLoader workers split the share again."""

    def __init__(self, bench, modalities, decoder, rank, world):
        super().__init__()
        self.args = (bench, modalities, decoder)
        self.rank, self.world = rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # part r + world * w: rank r's worker w; with one worker per rank, part = rank
        return decoded_share(*self.args, part=self.rank + self.world * worker, parts=self.world * workers)


def _share_items(bench, modalities, decoder, rank, world, workers):
    share = _Share(bench, modalities, decoder, rank, world)
    if workers == 0:
        return iter(share)
    # own generator: evaluation inside training must not draw from the trainer's global RNG
    loader = DataLoader(
        share, batch_size=None, num_workers=workers, generator=torch.Generator().manual_seed(0)
    )
    return iter(loader)


# ---------------------------------------------------------------- one benchmark


def _encode_share(model, bench, modalities, decoder, batch_size, rank, world, workers, caption_fn):
    """This rank's part: embeddings per modality (or generated captions) in local order."""
    device, dtype = model_device(model), model_float_dtype(model)
    if bench.task == "captioning":
        batchers = {"image": _Batcher(caption_fn, batch_size, device, dtype)}
    else:
        batchers = {
            # the waveform stays float32 for the mel frontend, as in training
            m: _Batcher(
                lambda x, m=m: model.encode(m, x).float(),
                batch_size,
                device,
                torch.float32 if m == "audio" else dtype,
            )
            for m in modalities
        }
    index, targets, skipped = [], [], Counter()
    for item in _share_items(bench, modalities, decoder, rank, world, workers):
        if "skip" in item:
            skipped[item["skip"]] += 1
            continue
        index.append(item["index"])
        targets.append(item["target"])
        for m, batcher in batchers.items():
            batcher.add(item[m])
    out = {}
    for m, batcher in batchers.items():
        results = batcher.finish()
        if bench.task == "captioning":
            out[m] = [c for batch in results for c in batch]
        else:
            out[m] = torch.cat(results) if results else torch.zeros(0, model.embed_dim, device=device)
    return index, targets, skipped, out


def evaluate_benchmark(
    model,
    bench: Benchmark,
    decoder: Decoder,
    *,
    batch_size: int = 256,
    workers: int = 0,
    caption_fn: Callable | None = None,
) -> dict:
    """Metrics of one benchmark (keys without the benchmark prefix). A collective call."""
    rank, world = world_info()
    wanted = [m for m in MODALITIES if m in model.modalities and m != "text"]
    if bench.task == "captioning":
        if caption_fn is None:
            return {}
        wanted = ["image"]
    if bench.task != "captioning" and "text" not in model.modalities:
        raise BenchmarkError(f"benchmark {bench.name}: this model has no text tower to compare against")
    modalities = detect_modalities(bench, wanted)
    if bench.task in ("composition", "captioning"):
        modalities = modalities[:1]
    try:
        index, targets, skipped, local = _encode_share(
            model, bench, modalities, decoder, batch_size, rank, world, workers, caption_fn
        )
        error = None
    except Exception as exc:  # told to every rank below, so none waits in a collective for this one
        failure, error = exc, f"{type(exc).__name__}: {exc}"
        index, targets, skipped = [], [], Counter()
        local = {m: torch.zeros(0, model.embed_dim, device=model_device(model)) for m in modalities}
    log.info("benchmark %s: rank %d of %d encoded %d samples", bench.name, rank, world, len(index))
    shared = _gather_objects(
        {
            "index": index,
            "targets": targets,
            "skipped": dict(skipped),
            "captions": local.get("image") if bench.task == "captioning" else None,
            "error": error,
        },
        world,
    )
    if error is not None:
        raise failure
    errors = [f"rank {r}: {part['error']}" for r, part in enumerate(shared) if part["error"]]
    if errors:
        raise BenchmarkError(f"benchmark {bench.name} failed on another rank: {errors[0]}")
    order = torch.tensor([i for part in shared for i in part["index"]], dtype=torch.long).argsort()
    all_targets = [t for part in shared for t in part["targets"]]
    all_targets = [all_targets[i] for i in order.tolist()]
    metrics: dict = {f"encoded/rank{r}": len(part["index"]) for r, part in enumerate(shared)}
    for part in shared:
        for reason, n in part["skipped"].items():
            metrics[f"skipped/{reason}"] = metrics.get(f"skipped/{reason}", 0) + n
    if not all_targets:
        raise BenchmarkError(f"benchmark {bench.name}: no sample could be read ({metrics})")
    if bench.task == "captioning":
        captions = [c for part in shared for c in part["captions"]]
        captions = [captions[i] for i in order.tolist()]
        mentions = [t["mentions"] for t in all_targets]
        categories = [str(t.get("category", "all")) for t in all_targets]
        metrics.update(tasks.captioning(captions, mentions, categories, bench.classnames))
        return metrics
    emb = {}
    for m in modalities:
        gathered = gather_rows(local[m], with_grad=False)[0][order.to(local[m].device)].cpu()
        bad = int((~torch.isfinite(gathered).all(dim=1)).sum())
        if bad:
            metrics[f"nonfinite/{m}"] = bad
            log.warning(
                "benchmark %s: %d of %d %s embeddings are not finite; they count as misses",
                bench.name,
                bad,
                gathered.shape[0],
                m,
            )
        emb[m] = gathered
    metrics.update(_task_metrics(model, bench, modalities, emb, all_targets, rank, world))
    return metrics


def _task_metrics(model, bench, modalities, emb, targets, rank, world) -> dict:
    out: dict = {}
    if bench.task == "classification":
        class_emb = _class_embeddings(model, bench, rank, world).cpu()
        labels = torch.tensor(targets, dtype=torch.long)
        for m in modalities:
            for k, v in tasks.classification(emb[m], labels, class_emb, CLASSIFICATION_KS).items():
                out[f"{m}/{k}"] = v
        if {"image", "audio"} <= set(modalities):
            both = tasks.trimodal_classification(
                emb["image"], emb["audio"], labels, class_emb, CLASSIFICATION_KS
            )
            for name, values in both.items():
                out.update({f"image+audio/{name}/{k}": v for k, v in values.items() if k != "n"})
        return out
    if bench.task == "retrieval":
        # identical caption strings are one gallery item: retrieving either copy is right
        texts, text_id, pairs = [], {}, []
        for sample, captions in enumerate(targets):
            for caption in dict.fromkeys(captions):
                pairs.append((sample, text_id.setdefault(caption, len(texts))))
                if len(texts) < len(text_id):
                    texts.append(caption)
        text_emb = _encode_texts(model, texts, rank, world).cpu()
        pairs = torch.tensor(pairs, dtype=torch.long)
        for m in modalities:
            both_ways = tasks.retrieval(emb[m], text_emb, pairs, RETRIEVAL_KS)
            out.update({f"{m}->text/R@{k}": v for k, v in both_ways["media->text"].items()})
            out.update({f"text->{m}/R@{k}": v for k, v in both_ways["text->media"].items()})
            out[f"{m}-text/n"] = len(targets)
            out[f"{m}-text/n_captions"] = len(texts)
        if {"image", "audio"} <= set(modalities):
            tri = tasks.trimodal_retrieval(emb["image"], emb["audio"], text_emb, pairs, RETRIEVAL_KS)
            for name, values in tri.items():
                out.update({f"text->(image,audio)/{name}/R@{k}": v for k, v in values.items()})
        return out
    # composition
    m = modalities[0]
    positives = [t["positive"] for t in targets]
    negatives = [n for t in targets for n in t["negatives"]]
    owner = torch.tensor([i for i, t in enumerate(targets) for _ in t["negatives"]], dtype=torch.long)
    text_emb = _encode_texts(model, positives + negatives, rank, world).cpu()
    categories = [str(t.get("category", "all")) for t in targets]
    out.update(
        tasks.composition(emb[m], text_emb[: len(positives)], text_emb[len(positives) :], owner, categories)
    )
    return out


def evaluate_benchmarks(
    model,
    benchmarks: list[Benchmark],
    decoder: Decoder,
    *,
    batch_size: int = 256,
    workers: int = 0,
    caption_fn: Callable | None = None,
) -> dict:
    """{"<benchmark>/<metric>": value} over every benchmark; the model is put in eval mode (BatchNorm
    running statistics) and its mode restored. A collective call when torch.distributed is up."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = {}
            for bench in benchmarks:
                values = evaluate_benchmark(
                    model, bench, decoder, batch_size=batch_size, workers=workers, caption_fn=caption_fn
                )
                metrics.update({f"{bench.name}/{k}": v for k, v in values.items()})
                faults.kill_point("eval")
            return metrics
    finally:
        model.train(was_training)
