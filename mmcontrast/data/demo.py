"""A tiny synthetic world of coloured shapes, seen, described and heard.

Every sample holds one or two objects (colour x shape). The same facts appear in three modalities:

    png   64x64 RGB picture: the objects on a plain grey background, pairs side by side
    txt   a caption from a small grammar ("a red circle to the left of a blue star")
    flac  1 s of 16 kHz mono: one tone per object, left object first; the pitch encodes the
          colour and the waveform the shape (circle=sine, square=square, triangle=triangle,
          star=sawtooth)
    json  {"objects": [{"color", "shape", "x", "y", "size"}, ...] (left to right), "caption_template"}

so a contrastive model can learn it in minutes on a CPU, and zero-shot classification over the 24
single-object classes ("red circle", ... colour-major) has a known answer. The val split is also
written as benchmark folders (mmcontrast.data.benchmark) under DIR/benchmarks/: the demo is one
producer of such folders, and evaluation never reads its metadata. Output is byte-for-byte
deterministic for a seed (fixed tar mtimes, owners and member order).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from webdataset import TarWriter

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
CLASSES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 40, 185),
    "orange": (250, 135, 15),
}
# Roughly a fourth apart, so neighbouring colours stay far apart even with the harmonics of
# square and sawtooth waves.
PITCH_HZ = {"red": 220.0, "green": 294.0, "blue": 392.0, "yellow": 523.0, "purple": 698.0, "orange": 932.0}

IMAGE_SIZE = 64
SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0
FIELDS = {"image": "png", "text": "txt", "audio": "flac"}

SINGLE_TEMPLATES = (
    "{a}",
    "a photo of {a}",
    "{a} on a plain background",
    "there is {a}",
    "a picture of {a}",
    "a single {o}",
)
PAIR_TEMPLATES = (
    "{a} to the left of {b}",
    "{b} to the right of {a}",
    "a photo of {a} and {b}",
    "{a} and {b}",
    "{a} next to {b}",
    "on the left {a}, on the right {b}",
)


def class_index(meta: dict) -> int | None:
    """Zero-shot class of a single-object sample's json metadata (None for pairs)."""
    objs = meta["objects"]
    if len(objs) != 1:
        return None
    return COLORS.index(objs[0]["color"]) * len(SHAPES) + SHAPES.index(objs[0]["shape"])


def _with_article(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


# ---------------------------------------------------------------- drawing


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x, y, s, fill = obj["x"], obj["y"], obj["size"], RGB[obj["color"]]
    r = s / 2
    if obj["shape"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:  # five-pointed star, inner radius chosen so the star reads as a star at 12 px
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)


def _render_png(objects: list[dict], grey: int) -> bytes:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_object(draw, obj)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------- sound


def _waveform(shape: str, phase: np.ndarray) -> np.ndarray:
    """One period per unit of `phase` (cycles)."""
    frac = np.mod(phase, 1.0)
    if shape == "circle":
        return np.sin(2 * np.pi * phase)
    if shape == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if shape == "triangle":
        return 4.0 * np.abs(frac - 0.5) - 1.0
    return 2.0 * frac - 1.0  # star: sawtooth


def _render_flac(objects: list[dict], rng: np.random.Generator) -> bytes:
    n = int(SAMPLE_RATE * AUDIO_SECONDS)
    out = np.zeros(n, dtype=np.float64)
    seg = 0.9 if len(objects) == 1 else 0.45
    seg_n = int(seg * SAMPLE_RATE)
    fade_n = int(0.01 * SAMPLE_RATE)
    ramp = np.ones(seg_n)
    ramp[:fade_n] = np.linspace(0.0, 1.0, fade_n)
    ramp[-fade_n:] = np.linspace(1.0, 0.0, fade_n)
    t = np.arange(seg_n) / SAMPLE_RATE
    for i, obj in enumerate(objects):
        start = int(rng.uniform(0.0, 0.05) * SAMPLE_RATE) + i * int(0.5 * SAMPLE_RATE)
        start = min(start, n - seg_n)
        phase = PITCH_HZ[obj["color"]] * t + rng.uniform()
        amp = rng.uniform(0.25, 0.6)
        out[start : start + seg_n] += amp * ramp * _waveform(obj["shape"], phase)
    out += rng.normal(0.0, rng.uniform(0.005, 0.03), n)
    buf = io.BytesIO()
    sf.write(buf, np.clip(out, -1.0, 1.0).astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------- samples


def _random_objects(rng: np.random.Generator) -> list[dict]:
    if rng.uniform() < 0.5:
        s = int(rng.integers(14, 27))
        lo, hi = s // 2 + 2, IMAGE_SIZE - s // 2 - 2
        return [
            {
                "color": COLORS[rng.integers(len(COLORS))],
                "shape": SHAPES[rng.integers(len(SHAPES))],
                "x": int(rng.integers(lo, hi)),
                "y": int(rng.integers(lo, hi)),
                "size": s,
            }
        ]
    while True:  # two different objects, so "left" and "right" are unambiguous in the caption
        kinds = [(COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]) for _ in range(2)]
        if kinds[0] != kinds[1]:
            break
    objects = []
    half = IMAGE_SIZE // 2
    for i, (color, shape) in enumerate(kinds):
        s = int(rng.integers(12, 21))
        x_lo = i * half + s // 2 + 1
        x_hi = (i + 1) * half - s // 2 - 1
        y_lo, y_hi = s // 2 + 2, IMAGE_SIZE - s // 2 - 2
        objects.append(
            {
                "color": color,
                "shape": shape,
                "x": int(rng.integers(x_lo, x_hi)),
                "y": int(rng.integers(y_lo, y_hi)),
                "size": s,
            }
        )
    return objects


def render_caption(template: str, objects: list[dict]) -> str:
    """A caption template ({a}, {b}: objects with article; {o}: without) filled with objects."""
    a = objects[0]
    fields = {"a": _with_article(a["color"], a["shape"]), "o": f"{a['color']} {a['shape']}"}
    if len(objects) > 1:
        fields["b"] = _with_article(objects[1]["color"], objects[1]["shape"])
    return template.format(**fields)


def make_sample(key: str, rng: np.random.Generator) -> dict:
    """One demo sample as a webdataset dict of encoded bytes."""
    objects = _random_objects(rng)
    templates = SINGLE_TEMPLATES if len(objects) == 1 else PAIR_TEMPLATES
    template = templates[rng.integers(len(templates))]
    caption = render_caption(template, objects)
    light = rng.uniform() < 0.5
    grey = int(rng.integers(170, 231) if light else rng.integers(25, 86))
    meta = {"objects": objects, "caption_template": template, "background": grey}
    return {
        "__key__": key,
        "png": _render_png(objects, grey),
        "txt": caption.encode("utf-8"),
        "flac": _render_flac(objects, rng),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _write_split(out: Path, split: str, n: int, seed: int, per_shard: int) -> list[str]:
    # One stream per split, so the train data does not change when --val changes.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    shards = []
    for shard in range(math.ceil(n / per_shard)):
        name = f"{split}-{shard:06d}.tar"
        # Fixed mtime/owner/mode: the same seed gives the same bytes.
        with TarWriter(
            str(out / name), encoder=False, mtime=0.0, user="demo", group="demo", mode=0o644
        ) as tw:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                tw.write(make_sample(f"{split}-{i:07d}", rng))
        shards.append(name)
    return shards


# Zero-shot prompts for the demo's classes: the same prompts serve images and sounds.
TEMPLATES = ("a {c}.", "a photo of a {c}.", "the sound of a {c}.")
BENCHMARKS = ("demo-classes", "demo-retrieval", "demo-composition", "demo-captions")


def write_demo_benchmarks(out_dir: str | Path, val_shards: list[Path]) -> dict[str, dict]:
    """The val split as benchmark folders: classes (single objects, image and sound), retrieval,
    composition (one hard negative per SugarCrepe-style category) and captioning."""
    from mmcontrast.data.benchmark import write_benchmark
    from mmcontrast.data.negatives import demo_negatives, sample_rng
    from mmcontrast.data.tar_events import tar_events

    out = Path(out_dir)
    samples = [s for path in val_shards for s in tar_events(str(path))]  # the shards just written
    metas = [json.loads(s["json"]) for s in samples]

    def classes():
        for s, meta in zip(samples, metas, strict=True):
            label = class_index(meta)
            if label is not None:
                yield {"__key__": s["__key__"], "png": s["png"], "flac": s["flac"], "cls": str(label)}

    def retrieval():
        for s in samples:
            yield {"__key__": s["__key__"], "png": s["png"], "flac": s["flac"], "txt": s["txt"]}

    def composition():
        for s, meta in zip(samples, metas, strict=True):
            truth = render_caption(meta["caption_template"], meta["objects"])
            for category, negative in demo_negatives(meta, sample_rng(s["__key__"])).items():
                spec = {"positive": truth, "negatives": [negative], "category": category}
                yield {"__key__": f"{s['__key__']}-{category}", "png": s["png"], "json": json.dumps(spec)}

    def captions():
        for s, meta in zip(samples, metas, strict=True):
            mentions = [f"{o['color']} {o['shape']}" for o in meta["objects"]]
            category = "single_object" if len(mentions) == 1 else "two_object"
            spec = {"mentions": mentions, "category": category}
            yield {"__key__": s["__key__"], "png": s["png"], "json": json.dumps(spec)}

    return {
        "demo-classes": write_benchmark(
            out / "demo-classes", "classification", classes(), list(CLASSES), list(TEMPLATES)
        ),
        "demo-retrieval": write_benchmark(out / "demo-retrieval", "retrieval", retrieval()),
        "demo-composition": write_benchmark(out / "demo-composition", "composition", composition()),
        "demo-captions": write_benchmark(out / "demo-captions", "captioning", captions(), list(CLASSES)),
    }


def _brace(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit("-", 1)[0]
    return f"{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar"


def write_demo_world(
    out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, samples_per_shard: int = 1000
) -> dict:
    """Write train/val shards, the val benchmark folders, manifest.json and classes.json under
    `out_dir`; return the manifest.

    The returned dict is the manifest plus "urls": absolute brace-expanded shard URLs per split,
    ready for DataConfig.train, and "benchmark_dirs": absolute benchmark folders for
    EvalConfig.benchmarks (the file keeps paths relative, so the folder can move).
    """
    if n_train < 0 or n_val < 0 or samples_per_shard < 1:
        raise ValueError(
            f"need n_train >= 0, n_val >= 0 and samples_per_shard >= 1, got {n_train}, {n_val}, {samples_per_shard}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        shards = _write_split(out, split, n, seed, samples_per_shard)
        splits[split] = {"samples": n, "shards": shards, "pattern": _brace(shards) if shards else ""}
    manifest = {
        "name": "mmcontrast-demo",
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "splits": splits,
        "classes": list(CLASSES),
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "fields": FIELDS,
        "image_size": IMAGE_SIZE,
        "audio_sample_rate": SAMPLE_RATE,
        "audio_seconds": AUDIO_SECONDS,
    }
    if n_val:
        write_demo_benchmarks(out / "benchmarks", [out / s for s in splits["val"]["shards"]])
        manifest["benchmarks"] = {name: f"benchmarks/{name}" for name in BENCHMARKS}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "classes.json").write_text(json.dumps(list(CLASSES), indent=2) + "\n")
    urls = {s: str(out.resolve() / v["pattern"]) if v["pattern"] else "" for s, v in splits.items()}
    benchmarks = [str(out.resolve() / p) for p in manifest.get("benchmarks", {}).values()]
    return {**manifest, "urls": urls, "benchmark_dirs": benchmarks}


def main_demo(argv: list[str] | None = None) -> dict:
    """`mmcontrast data demo --out DIR --train N --val M --seed S [--per-shard K]`."""
    p = argparse.ArgumentParser(prog="mmcontrast data demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=5000, help="number of train samples")
    p.add_argument("--val", type=int, default=500, help="number of val samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    a = p.parse_args(argv)
    manifest = write_demo_world(a.out, a.train, a.val, a.seed, a.per_shard)
    for split in ("train", "val"):
        info = manifest["splits"][split]
        print(
            f"{split}: {info['samples']} samples in {len(info['shards'])} shards: {manifest['urls'][split]}"
        )
    return manifest
