"""Benchmark folders: clip_benchmark's `wds` layout, extended to audio, retrieval and composition.

    DIR/dataset_type.txt                        classification | retrieval | composition | captioning
    DIR/classnames.txt                          one class per line (classification, captioning)
    DIR/zeroshot_classification_templates.txt   one template per line, "{c}" marks the class
    DIR/test/nshards.txt, DIR/test/0.tar ...    samples

Samples hold an image (webp, png, jpg, jpeg) and/or an audio clip (flac, wav, mp3, ogg) and:
classification `cls` (class index as text); retrieval `txt` (one caption per line, each a
positive); composition `json` {"positive", "negatives": [...], "category"}; captioning `json`
{"mentions": [class names the caption must name], "category"}.

This module writes such folders (the demo world and `mmcontrast data benchmark` use it);
mmcontrast.eval.benchmark reads them.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from webdataset import TarWriter

TASKS = ("classification", "retrieval", "composition", "captioning")
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
MEDIA_EXTS = {"image": IMAGE_EXTS, "audio": AUDIO_EXTS}
SPLIT = "test"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"


def media_of(sample: dict) -> dict[str, str]:
    """modality -> the sample's field holding it (first of the modality's extensions)."""
    found = {}
    for modality, exts in MEDIA_EXTS.items():
        ext = next((e for e in exts if e in sample), None)
        if ext is not None:
            found[modality] = ext
    return found


def clip_benchmark_template(template: str) -> str:
    """clip_benchmark fills templates with str.format(c=name); mmcontrast also takes "{}"."""
    return template.replace("{}", "{c}")


def write_benchmark(
    out_dir,
    task: str,
    samples: Iterable[dict],
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    samples_per_shard: int = 1000,
) -> dict:
    """Write `samples` (dicts of __key__ and extension -> bytes or str) as a benchmark folder.

    An earlier test/ split of the folder is replaced whole, so no stale shard is read back.
    Returns {"dir", "task", "samples", "shards"}.
    """
    if task not in TASKS:
        raise ValueError(f"unknown benchmark task {task!r}; choose from {', '.join(TASKS)}")
    if task in ("classification", "captioning") and not classnames:
        raise ValueError(f"a {task} benchmark needs class names")
    if task == "classification" and not templates:
        raise ValueError("a classification benchmark needs at least one template such as 'a photo of a {c}.'")
    out = Path(out_dir)
    split = out / SPLIT
    if split.exists():
        shutil.rmtree(split)
    split.mkdir(parents=True)
    n, shards, sink = 0, 0, None
    try:
        for sample in samples:
            if n % samples_per_shard == 0:
                if sink is not None:
                    sink.close()
                # fixed mtime and owner: the same samples give the same bytes
                sink = TarWriter(
                    str(split / f"{shards}.tar"),
                    encoder=False,
                    mtime=0.0,
                    user="mmc",
                    group="mmc",
                    mode=0o644,
                )
                shards += 1
            sink.write(
                {
                    k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v
                    for k, v in sample.items()
                }
            )
            n += 1
    finally:
        if sink is not None:
            sink.close()
    if n == 0:
        raise ValueError(f"no samples to write to the {task} benchmark {out}")
    (split / "nshards.txt").write_text(f"{shards}\n")
    (out / DATASET_TYPE).write_text(f"{task}\n")
    if classnames:
        (out / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames))
    if templates:
        (out / TEMPLATES).write_text("".join(f"{clip_benchmark_template(t)}\n" for t in templates))
    return {"dir": str(out), "task": task, "samples": n, "shards": shards}


def _read_lines(path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file {path} has no lines")
    return lines


def _label_of(raw: dict, ref, classnames: list[str]) -> int:
    """Class index from a `cls` field or a JSON key: an index, or a class name."""
    if ref.ext not in raw:
        raise KeyError(ref.ext)
    value = raw[ref.ext].decode("utf-8").strip()
    if ref.key is not None:
        value = json.loads(value)
        for part in ref.key.split("."):
            value = value[part]
    if isinstance(value, str) and value.strip() in classnames:
        return classnames.index(value.strip())
    index = int(value)
    if not 0 <= index < len(classnames):
        raise ValueError(f"class index {index} is outside [0, {len(classnames)})")
    return index


def benchmark_from_shards(
    urls: str,
    out_dir,
    task: str,
    classnames_file=None,
    templates_file=None,
    label_field: str = "cls",
    caption_field: str = "txt",
    samples_per_shard: int = 1000,
) -> dict:
    """A user's held-out shards -> a classification or retrieval benchmark folder.

    Media bytes are copied unchanged. Labels come from `label_field` (`cls`, or `json:KEY` holding
    an index or a class name); captions from `caption_field` (`txt`, or `json:KEY` holding a string
    or a list). A sample without media, label or caption is skipped and counted in the summary.
    """
    from mmcontrast.data.fields import captions_from_sample, parse_field_spec
    from mmcontrast.data.pipeline import expand_sources
    from mmcontrast.data.tar_events import tar_events

    if task not in ("classification", "retrieval"):
        raise ValueError(f"--task must be classification or retrieval, got {task!r}")
    classnames = templates = None
    if task == "classification":
        classnames = _read_lines(classnames_file, "class names") if classnames_file else None
        templates = _read_lines(templates_file, "templates") if templates_file else None
        if not classnames or not templates:
            raise ValueError("a classification benchmark needs --classnames FILE and --templates FILE")
        (label_ref,) = parse_field_spec(label_field)[:1]
    caption_refs = parse_field_spec(caption_field)
    skipped: Counter = Counter()
    urls_flat = [u for source in expand_sources(urls) for u in source]

    def samples():
        for url in urls_flat:
            for raw in tar_events(url):
                if not isinstance(raw, dict):
                    skipped[raw.reason] += 1
                    continue
                media = {ext: raw[ext] for ext in media_of(raw).values()}  # copied unchanged
                if not media:
                    skipped["no_media"] += 1
                    continue
                sample = {"__key__": raw["__key__"], **media}
                if task == "classification":
                    try:
                        sample["cls"] = str(_label_of(raw, label_ref, classnames))
                    except KeyError:
                        skipped["no_label"] += 1
                        continue
                    except (ValueError, TypeError, UnicodeDecodeError):
                        skipped["bad_label"] += 1
                        continue
                else:
                    try:
                        captions = captions_from_sample(raw, caption_refs, lines=True)
                    except ValueError:
                        skipped["bad_caption"] += 1
                        continue
                    if not captions:
                        skipped["no_caption"] += 1
                        continue
                    sample["txt"] = "\n".join(c.replace("\n", " ") for c in captions)
                yield sample

    summary = write_benchmark(out_dir, task, samples(), classnames, templates, samples_per_shard)
    return {**summary, "skipped": dict(skipped)}
