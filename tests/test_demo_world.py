"""The demo world: deterministic shards whose picture, caption and sound agree with the json."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmcontrast.data.demo import (
    CLASSES,
    COLORS,
    PITCH_HZ,
    RGB,
    SHAPES,
    class_index,
    main_demo,
    write_demo_world,
)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _samples(path):
    """Group a shard's members by key (members of a sample are adjacent)."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_world(out, n_train=50, n_val=20, seed=3, samples_per_shard=16)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_demo_world(tmp_path / "a", 12, 5, seed=7, samples_per_shard=5)
    write_demo_world(tmp_path / "b", 12, 5, seed=7, samples_per_shard=5)
    write_demo_world(tmp_path / "c", 12, 5, seed=8, samples_per_shard=5)
    da, db, dc = (_digests(tmp_path / x) for x in "abc")
    assert list(da) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert da == db
    assert all(da[k] != dc[k] for k in da)
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert a["splits"]["train"]["pattern"] == "train-{000000..000002}.tar"


def test_manifest_counts_and_classes(world):
    out, manifest = world
    on_disk = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k not in ("urls", "benchmark_dirs")} == on_disk
    assert on_disk["splits"]["train"]["samples"] == 50
    assert on_disk["splits"]["val"]["samples"] == 20
    assert on_disk["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(4)]
    assert on_disk["splits"]["val"]["shards"] == ["val-000000.tar", "val-000001.tar"]
    counts = [len(_samples(out / s)) for s in on_disk["splits"]["train"]["shards"]]
    assert counts == [16, 16, 16, 2]
    assert manifest["urls"]["train"] == str(out.resolve() / "train-{000000..000003}.tar")
    classes = json.loads((out / "classes.json").read_text())
    assert classes == list(CLASSES) == on_disk["classes"]
    assert len(classes) == 24 and len(set(classes)) == 24
    assert classes[:5] == ["red circle", "red square", "red triangle", "red star", "green circle"]


def test_val_split_as_benchmark_folders(world):
    """The demo's benchmarks are plain folders: the single-object val samples with their class
    index, every val sample with its caption, and one sample per negative category."""
    from mmcontrast.data.demo import class_index
    from mmcontrast.eval import read_benchmark
    from tests.test_eval import _raw_samples

    out, manifest = world
    val = {k: s for shard in manifest["splits"]["val"]["shards"] for k, s in _samples(out / shard).items()}
    metas = {k: json.loads(s["json"]) for k, s in val.items()}
    dirs = {Path(d).name: Path(d) for d in manifest["benchmark_dirs"]}
    assert {n: read_benchmark(d).task for n, d in dirs.items()} == {
        "demo-classes": "classification",
        "demo-retrieval": "retrieval",
        "demo-composition": "composition",
        "demo-captions": "captioning",
    }
    classes = {s["key"]: int(s["cls"]) for s in _raw_samples(dirs["demo-classes"])}
    single = {k: class_index(m) for k, m in metas.items() if len(m["objects"]) == 1}
    assert classes == single and read_benchmark(dirs["demo-classes"]).classnames == list(CLASSES)
    captions = {s["key"]: s["txt"] for s in _raw_samples(dirs["demo-retrieval"])}
    assert captions == {k: s["txt"] for k, s in val.items()}
    categories = [json.loads(s["json"])["category"] for s in _raw_samples(dirs["demo-composition"])]
    assert categories.count("replace_att") == len(val) and categories.count("swap_obj") < len(val)


def _dominant_and_harmonics(seg, sr, f):
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    freqs = np.fft.rfftfreq(len(seg), 1 / sr)

    def amp(x):
        i = int(np.argmin(np.abs(freqs - x)))
        return spec[max(i - 3, 0) : i + 4].max()

    return freqs[int(np.argmax(spec))], amp(2 * f) / amp(f), amp(3 * f) / amp(f)


def _shape_from_harmonics(h2, h3):
    if h2 > 0.3:
        return "star"  # sawtooth: every harmonic, 1/k
    if h3 > 0.22:
        return "square"  # odd harmonics, 1/k
    if h3 > 0.05:
        return "triangle"  # odd harmonics, 1/k^2
    return "circle"  # pure sine


def test_samples_agree_with_metadata(world):
    out, manifest = world
    samples = {}
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            samples.update(_samples(out / shard))
    assert len(samples) == 70
    n_pairs = 0
    for key, s in samples.items():
        assert set(s) == {"png", "txt", "flac", "json"}, key
        meta = json.loads(s["json"])
        objs = meta["objects"]
        caption = s["txt"].decode()
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (64, 64)
        wave, sr = sf.read(io.BytesIO(s["flac"]))
        assert sr == 16000 and wave.shape == (16000,)
        assert 0.01 < np.abs(wave).max() <= 1.0
        if len(objs) == 2:
            n_pairs += 1
            assert objs[0]["x"] < 32 <= objs[1]["x"], key
            assert (objs[0]["color"], objs[0]["shape"]) != (objs[1]["color"], objs[1]["shape"])
            assert class_index(meta) is None
            segments = [wave[:8000], wave[8000:]]  # left object sounds first
        else:
            assert 14 <= objs[0]["size"] <= 26
            assert CLASSES[class_index(meta)] == f"{objs[0]['color']} {objs[0]['shape']}"
            segments = [wave]
        for o, seg in zip(objs, segments, strict=True):
            assert o["color"] in COLORS and o["shape"] in SHAPES
            assert f"{o['color']} {o['shape']}" in caption, (key, caption)
            assert img.getpixel((o["x"], o["y"])) == RGB[o["color"]], key
            f0, h2, h3 = _dominant_and_harmonics(seg, sr, PITCH_HZ[o["color"]])
            assert abs(f0 - PITCH_HZ[o["color"]]) < 5, (key, f0, o)
            assert _shape_from_harmonics(h2, h3) == o["shape"], (key, h2, h3, o)
        if len(objs) == 2:
            left, right = (f"{o['color']} {o['shape']}" for o in objs)
            if "right of" in caption:  # "B to the right of A" names the right object first
                assert caption.index(right) < caption.index(left), caption
            else:
                assert caption.index(left) < caption.index(right), caption
    assert 20 <= n_pairs <= 50  # about half


def test_main_demo_cli(tmp_path, capsys):
    manifest = main_demo(
        ["--out", str(tmp_path / "w"), "--train", "6", "--val", "3", "--seed", "1", "--per-shard", "4"]
    )
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert (tmp_path / "w" / "val-000000.tar").exists()
    assert "train: 6 samples in 2 shards" in capsys.readouterr().out
