"""Read a benchmark folder (layout in mmcontrast.data.benchmark) and decode its samples.

`read_benchmark(DIR)` checks the layout and names the file at fault; `decoded_share(...)` yields
the decoded samples of one part of the work (a rank, or one decoding worker of a rank).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mmcontrast.config import DataConfig
from mmcontrast.data.audio import decode_audio
from mmcontrast.data.benchmark import CLASSNAMES, DATASET_TYPE, SPLIT, TASKS, TEMPLATES, media_of
from mmcontrast.data.image import decode_image
from mmcontrast.data.tar_events import tar_events

log = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """A benchmark folder or sample that cannot give a right number, with the file named."""


@dataclass
class Benchmark:
    name: str  # the folder's name: the prefix of its metric keys
    root: Path
    task: str
    classnames: list[str]
    templates: list[str]
    shards: list[str]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_benchmark(path) -> Benchmark:
    """The folder's task, class names, templates and shards; a broken layout raises BenchmarkError."""
    root = Path(path)
    if not root.is_dir():
        raise BenchmarkError(f"benchmark folder {root} does not exist")
    nshards = root / SPLIT / "nshards.txt"
    if not nshards.is_file():
        raise BenchmarkError(f"{nshards} is missing: it gives the number of shards test/0.tar ... N-1.tar")
    try:
        n = int(nshards.read_text().strip())
    except ValueError:
        raise BenchmarkError(f"{nshards} does not hold an integer") from None
    shards = [root / SPLIT / f"{i}.tar" for i in range(n)]
    missing = [str(s) for s in shards if not s.is_file()]
    if n < 1 or missing:
        raise BenchmarkError(f"{nshards} says {n} shards, but {', '.join(missing[:3]) or 'none'} is missing")
    task = "classification"
    if (root / DATASET_TYPE).is_file():
        task = (root / DATASET_TYPE).read_text().strip() or task
    if task not in TASKS:
        raise BenchmarkError(f"{root / DATASET_TYPE} says {task!r}; allowed: {', '.join(TASKS)}")
    classnames, templates = [], []
    if task in ("classification", "captioning"):
        if not (root / CLASSNAMES).is_file():
            raise BenchmarkError(f"{root / CLASSNAMES} is missing: a {task} benchmark needs its class names")
        classnames = _lines(root / CLASSNAMES)
        if not classnames:
            raise BenchmarkError(f"{root / CLASSNAMES} has no class names")
    if task == "classification":
        if not (root / TEMPLATES).is_file():
            raise BenchmarkError(f"{root / TEMPLATES} is missing: zero-shot classification needs templates")
        templates = _lines(root / TEMPLATES)
        if not templates or not all("{c}" in t or "{}" in t for t in templates):
            raise BenchmarkError(f"{root / TEMPLATES}: every template needs a {{c}} for the class name")
    return Benchmark(root.name, root, task, classnames, templates, [str(s) for s in shards])


@dataclass
class Decoder:
    """How this model reads benchmark media: the image preprocess and the audio length."""

    preprocess: Callable | None
    audio_sample_rate: int
    audio_num_samples: int
    max_image_pixels: int = DataConfig.max_image_pixels

    def decode(self, modality: str, data: bytes) -> torch.Tensor:
        if modality == "image":
            return self.preprocess(decode_image(data, self.max_image_pixels))
        return decode_audio(data, self.audio_sample_rate, self.audio_num_samples)


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')} (sample {sample.get('__key__', '?')!r})"


def _target(bench: Benchmark, raw: dict) -> object:
    """The task's answer for a sample: a class index, captions, or a JSON dict. Broken ones raise
    BenchmarkError (a wrong label would silently change the number); an empty caption file is None."""
    where = _where(raw)
    if bench.task == "classification":
        if "cls" not in raw:
            raise BenchmarkError(f"{where} has no .cls field")
        try:
            label = int(raw["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise BenchmarkError(f"{where}: .cls {raw['cls'][:20]!r} is not an integer") from None
        if not 0 <= label < len(bench.classnames):
            raise BenchmarkError(
                f"{where}: class {label} is outside the {len(bench.classnames)} classes of "
                f"{bench.root / CLASSNAMES}"
            )
        return label
    if bench.task == "retrieval":
        if "txt" not in raw:
            raise BenchmarkError(f"{where} has no .txt captions")
        try:
            captions = _lines_of(raw["txt"])
        except UnicodeDecodeError:
            raise BenchmarkError(f"{where}: .txt is not UTF-8") from None
        return captions or None
    if "json" not in raw:
        raise BenchmarkError(f"{where} has no .json field")
    try:
        spec = json.loads(raw["json"])
    except ValueError as exc:
        raise BenchmarkError(f"{where}: .json does not parse: {exc}") from None
    need = {"composition": ("positive", "negatives"), "captioning": ("mentions",)}[bench.task]
    if not isinstance(spec, dict) or any(k not in spec for k in need):
        raise BenchmarkError(f"{where}: a {bench.task} .json needs the keys {', '.join(need)}")
    if bench.task == "composition" and not (
        isinstance(spec["positive"], str)
        and isinstance(spec["negatives"], list)
        and spec["negatives"]
        and all(isinstance(t, str) for t in spec["negatives"])
    ):
        raise BenchmarkError(
            f"{where}: 'positive' must be a string and 'negatives' a non-empty list of strings"
        )
    if bench.task == "captioning" and not all(isinstance(m, str) for m in spec["mentions"]):
        raise BenchmarkError(f"{where}: 'mentions' must be a list of class names")
    return spec


def _lines_of(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def detect_modalities(bench: Benchmark, wanted: list[str]) -> list[str]:
    """The media of the benchmark's first sample that the model can encode, in `wanted` order."""
    for url in bench.shards:
        for raw in tar_events(url):
            if isinstance(raw, dict):
                found = media_of(raw)
                usable = [m for m in wanted if m in found]
                if not usable:
                    raise BenchmarkError(
                        f"{_where(raw)} holds {', '.join(found) or 'no image or audio'}; this model "
                        f"encodes {', '.join(wanted)}"
                    )
                return usable
    raise BenchmarkError(f"benchmark {bench.root} has no readable sample")


# Samples of one shard, at most: a sample's order key is shard * SHARD_STRIDE + position.
SHARD_STRIDE = 2**32


def decoded_share(
    bench: Benchmark, modalities: list[str], decoder: Decoder, part: int = 0, parts: int = 1
) -> Iterator[dict]:
    """One part's samples, decoded: {"index", "key", <modality>: tensor, "target": ...}, or
    {"index", "key", "skip": reason} for a counted skip (unreadable media, empty captions).

    With at least `parts` shards a part reads whole shards (shard s goes to part s % parts), so
    no shard is read twice; with fewer, every part reads them all and decodes sample i when
    i % parts == part. "index" orders the samples as the folder holds them.
    """
    by_shard = len(bench.shards) >= parts
    counter = 0
    for s, url in enumerate(bench.shards):
        if by_shard and s % parts != part:
            continue
        for position, raw in enumerate(tar_events(url)):
            counter += 1
            if not by_shard and (counter - 1) % parts != part:
                continue
            item = {"index": s * SHARD_STRIDE + position, "key": getattr(raw, "key", None)}
            if not isinstance(raw, dict):  # a truncated or unreadable shard
                yield {**item, "skip": raw.reason}
                continue
            item["key"] = raw["__key__"]
            target = _target(bench, raw)
            if target is None:
                yield {**item, "skip": "empty_caption"}
                continue
            yield _decoded(bench, raw, item, target, modalities, decoder)


def _decoded(bench, raw: dict, item: dict, target, modalities: list[str], decoder: Decoder) -> dict:
    fields = media_of(raw)
    out = {**item, "target": target}
    for m in modalities:
        if m not in fields:
            return {**item, "skip": f"missing_{m}"}
        try:
            out[m] = decoder.decode(m, raw[fields[m]])
        except Exception as exc:
            log.warning("benchmark %s: skipping %s: unreadable %s (%s)", bench.name, _where(raw), m, exc)
            return {**item, "skip": f"bad_{m}"}
    return out
