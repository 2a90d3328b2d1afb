"""Benchmark folders -> metrics: known answers, brute force, broken input, several ranks, exports."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from mmcontrast.cli import main
from mmcontrast.data.benchmark import write_benchmark
from mmcontrast.eval import BenchmarkError, Decoder, evaluate_benchmarks, format_metrics_table, read_benchmark
from mmcontrast.eval import metrics as metrics_mod
from mmcontrast.eval.metrics import class_embeddings, recall_at_k
from tests import benchmark_helpers as bh
from tests.distributed import run_ranks

DECODER = Decoder(bh.ColourModel.preprocess, bh.SAMPLE_RATE, bh.NUM_SAMPLES)


def _run(folders, model=None, workers=0, batch_size=2) -> dict:
    model = model or bh.ColourModel()
    return evaluate_benchmarks(
        model, [read_benchmark(f) for f in folders], DECODER, batch_size=batch_size, workers=workers
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    bh.image_classes(root / "images")
    bh.audio_classes(root / "sounds")
    bh.retrieval(root / "captions")
    bh.composition(root / "compose")
    return {name: root / name for name in ("images", "sounds", "captions", "compose")}


# ---------------------------------------------------------------- brute force, from raw samples


def _raw_samples(folder):
    """A benchmark folder's samples in order, each {"key": ..., extension: bytes}."""
    from tests.test_demo_world import _samples

    for shard in read_benchmark(folder).shards:
        for key, fields in _samples(shard).items():
            yield {"key": key, **fields}


def _embed(model, sample):
    if "png" in sample:
        with Image.open(io.BytesIO(sample["png"])) as im:
            return "image", model.encode("image", model.preprocess(im.convert("RGB"))[None])[0]
    from mmcontrast.data.audio import decode_audio

    ext = "flac" if "flac" in sample else "wav"
    wave = decode_audio(sample[ext], bh.SAMPLE_RATE, bh.NUM_SAMPLES)
    return "audio", model.encode("audio", wave[None])[0]


def _text(model, text):
    return model.encode("text", model.tokenizer([text]))[0]


def _rank(scores: list[float], positive: set[int]) -> int:
    """How many wrong items score at least as high as the best right one."""
    best = max(scores[j] for j in positive)
    return sum(1 for j, s in enumerate(scores) if j not in positive and s >= best)


def _brute_classification(model, folder):
    bench = read_benchmark(folder)
    classes = []
    for name in bench.classnames:
        prompts = [F.normalize(_text(model, t.replace("{c}", name)), dim=0) for t in bench.templates]
        classes.append(F.normalize(torch.stack(prompts).mean(0), dim=0))
    ranks, labels, modality = [], [], None
    for sample in _raw_samples(folder):
        modality, emb = _embed(model, sample)
        label = int(sample["cls"])
        ranks.append(_rank([float(emb @ c) for c in classes], {label}))
        labels.append(label)
    recall = [
        np.mean([r < 1 for r, lab in zip(ranks, labels, strict=True) if lab == c])
        for c in sorted(set(labels))
    ]
    return {
        f"{modality}/top1": np.mean([r < 1 for r in ranks]),
        f"{modality}/top5": np.mean([r < 5 for r in ranks]),
        f"{modality}/mean_per_class_recall": np.mean(recall),
        f"{modality}/n": len(ranks),
    }


def _brute_retrieval(model, folder):
    samples = list(_raw_samples(folder))
    media = [_embed(model, s)[1] for s in samples]
    captions = [[c for c in s["txt"].decode().splitlines() if c.strip()] for s in samples]
    texts = list(dict.fromkeys(c for cs in captions for c in cs))
    text_emb = [_text(model, t) for t in texts]
    out = {}
    for k in (1, 5, 10):
        hits = [
            _rank([float(m @ t) for t in text_emb], {texts.index(c) for c in cs}) < k
            for m, cs in zip(media, captions, strict=True)
        ]
        out[f"image->text/R@{k}"] = np.mean(hits)
        hits = [
            _rank([float(t @ m) for m in media], {i for i, cs in enumerate(captions) if text in cs}) < k
            for text, t in zip(texts, text_emb, strict=True)
        ]
        out[f"text->image/R@{k}"] = np.mean(hits)
    out["image-text/n"], out["image-text/n_captions"] = len(samples), len(texts)
    return out


def _brute_composition(model, folder):
    right = {}
    for sample in _raw_samples(folder):
        spec = json.loads(sample["json"])
        emb = _embed(model, sample)[1]
        true = float(emb @ _text(model, spec["positive"]))
        ok = all(true > float(emb @ _text(model, n)) for n in spec["negatives"])
        right.setdefault(spec["category"], []).append(ok)
    out = {}
    for category, oks in right.items():
        out[category], out[f"{category}/n"] = np.mean(oks), len(oks)
    return out


def _without_counters(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "/encoded/" not in k}


# ---------------------------------------------------------------- known answers and brute force


def test_metrics_match_known_answers_and_brute_force(folders):
    got = _run(folders.values())
    model = bh.ColourModel()
    # by hand (see benchmark_helpers): ties count against the query
    assert got["images/image/top1"] == pytest.approx(4 / 6)
    assert got["images/image/top5"] == pytest.approx(5 / 6)
    assert got["images/image/mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1 + 0.5) / 4)
    assert got["sounds/audio/top1"] == pytest.approx(3 / 4)
    assert got["captions/image->text/R@1"] == pytest.approx(3 / 5)
    assert got["captions/text->image/R@1"] == pytest.approx(4 / 6)
    assert got["captions/image-text/n_captions"] == 6
    assert got["compose/replace_att"] == pytest.approx(2 / 3) and got["compose/replace_obj"] == 0.0
    # every metric against the brute-force loops over the raw samples
    want = {}
    want.update({f"images/{k}": v for k, v in _brute_classification(model, folders["images"]).items()})
    want.update({f"sounds/{k}": v for k, v in _brute_classification(model, folders["sounds"]).items()})
    want.update({f"captions/{k}": v for k, v in _brute_retrieval(model, folders["captions"]).items()})
    want.update({f"compose/{k}": v for k, v in _brute_composition(model, folders["compose"]).items()})
    assert _without_counters(got).keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_workers_and_batch_size_do_not_change_the_numbers(folders):
    assert _run(folders.values(), workers=2, batch_size=3) == _run(folders.values())


def _on_ranks(rank, world, folders):
    return _run(folders)


def test_two_ranks_split_the_work_and_agree_with_one(folders):
    alone = _run(folders.values())
    ranks = run_ranks(2, _on_ranks, [str(f) for f in folders.values()])
    assert ranks[0] == ranks[1]  # every rank ends with the whole result
    assert _without_counters(ranks[0]) == _without_counters(alone)
    for name, n in (("images", 6), ("sounds", 4), ("captions", 5), ("compose", 4)):
        shares = [ranks[0][f"{name}/encoded/rank{r}"] for r in (0, 1)]
        assert sum(shares) == n and abs(shares[0] - shares[1]) <= 1, (name, shares)


# ---------------------------------------------------------------- pure metric functions


def _brute_force_recall(scores, positives, k):
    hits = 0
    for row, pos in zip(scores.tolist(), positives.tolist(), strict=True):
        hits += _rank(row, {j for j, p in enumerate(pos) if p}) < k
    return hits / len(scores)


def test_recall_matches_brute_force_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    gal = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    groups = torch.randint(0, 30, (37,), generator=g)  # several positives per query
    positives = groups[None, :] == groups[:, None]
    want = {k: _brute_force_recall(q @ gal.T, positives, k) for k in (1, 5)}
    assert recall_at_k(q @ gal.T, positives, (1, 5)) == pytest.approx(want)
    monkeypatch.setattr(metrics_mod, "CHUNK", 5)  # chunking must not change the result
    assert metrics_mod.chunked_recall(q, gal, lambda a, b: positives[a:b], (1, 5)) == pytest.approx(want)


def test_non_finite_scores_are_never_hits():
    scores = torch.tensor([[float("nan"), 0.1], [0.9, float("nan")], [0.5, 0.4]])
    positives = torch.tensor([[True, False], [True, False], [True, False]])
    # a NaN positive misses; a NaN negative outranks the positive
    assert recall_at_k(scores, positives, (1, 2)) == {1: 1 / 3, 2: 2 / 3}


def test_class_embeddings_in_chunks_equal_one_pass(monkeypatch):
    model = bh.ColourModel()
    templates = ["a {c}.", "the {c}", "{c}!"]
    whole = class_embeddings(lambda t: model.encode("text", t), model.tokenizer, bh.CLASSNAMES, templates)
    monkeypatch.setattr(metrics_mod, "TEXT_CHUNK", 4)  # one class (3 templates) per chunk
    chunked = class_embeddings(lambda t: model.encode("text", t), model.tokenizer, bh.CLASSNAMES, templates)
    torch.testing.assert_close(chunked, whole)


# ---------------------------------------------------------------- broken input


def test_missing_classnames_names_the_file(folders, tmp_path):
    bh.image_classes(tmp_path / "b")
    (tmp_path / "b" / "classnames.txt").unlink()
    with pytest.raises(BenchmarkError, match=r"classnames\.txt is missing"):
        read_benchmark(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(BenchmarkError, match=r"test/nshards\.txt is missing"):
        read_benchmark(tmp_path / "c")


def test_class_out_of_range_names_the_shard_and_sample(tmp_path):
    bh.image_classes(tmp_path / "b", extra=[{"__key__": "bad", "png": bh.png("red"), "cls": "6"}])
    with pytest.raises(BenchmarkError, match=r"0\.tar \(sample 'bad'\): class 6 is outside the 6 classes"):
        _run([tmp_path / "b"])


def _wav_with_nan() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(400, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_unreadable_media_and_empty_captions_are_counted_skips(tmp_path):
    bh.image_classes(tmp_path / "img", extra=[{"__key__": "junk", "png": b"not a png", "cls": "0"}])
    bh.retrieval(tmp_path / "txt", extra=[{"__key__": "empty", "png": bh.png("red"), "txt": " \n"}])
    snd = [
        {"__key__": "ok", "flac": bh.tone(["red"]), "cls": "0"},
        {"__key__": "nan", "wav": _wav_with_nan(), "cls": "0"},
    ]
    write_benchmark(tmp_path / "snd", "classification", snd, bh.CLASSNAMES, ["{c}"])
    got = _run([tmp_path / "img", tmp_path / "txt", tmp_path / "snd"])
    assert got["img/skipped/bad_image"] == 1 and got["img/image/n"] == 6
    assert got["img/image/top1"] == pytest.approx(4 / 6)  # the same as without the broken sample
    assert got["txt/skipped/empty_caption"] == 1 and got["txt/image-text/n"] == 5
    assert got["snd/skipped/bad_audio"] == 1 and got["snd/audio/n"] == 1


def test_a_nan_model_scores_zero_and_says_so(folders, caplog):
    got = _run(folders.values(), model=bh.ColourModel(nan=True))
    assert got["images/nonfinite/image"] == 6 and got["sounds/nonfinite/audio"] == 4
    scores = {k: v for k, v in got.items() if k.rsplit("/", 1)[-1].startswith(("top", "R@", "mean_per"))}
    assert scores and all(v == 0.0 for v in scores.values()), scores
    assert got["compose/replace_att"] == 0.0
    assert "not finite; they count as misses" in caplog.text
    assert "WARNING: non-finite embeddings" in format_metrics_table(got)


def test_benchmark_from_user_shards(tmp_path):
    """`mmcontrast data benchmark`: labels from a JSON key (name or index), captions from a list."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "held-out.tar")) as sink:
        for i, colour in enumerate(["red", "green", "blue"]):
            meta = {"label": colour if i else 0, "captions": [f"a {colour} thing", f"{colour}"]}
            sink.write({"__key__": f"u{i}", "jpg": bh.png(colour), "json": json.dumps(meta).encode()})
        sink.write({"__key__": "nolabel", "jpg": bh.png("red"), "json": b"{}"})
    (tmp_path / "classes.txt").write_text("\n".join(bh.CLASSNAMES) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of {c}.\n")
    args = [
        "data",
        "benchmark",
        "--data",
        str(tmp_path / "held-out.tar"),
        "--classnames",
        str(tmp_path / "classes.txt"),
    ]
    main([*args, "--out", str(tmp_path / "cls"), "--task", "classification", "--label-field", "json:label",
          "--templates", str(tmp_path / "templates.txt")])  # fmt: skip
    main([*args, "--out", str(tmp_path / "ret"), "--task", "retrieval", "--caption-field", "json:captions"])
    got = _run([tmp_path / "cls", tmp_path / "ret"])
    assert got["cls/image/top1"] == 1.0 and got["cls/image/n"] == 3
    assert got["ret/image-text/n"] == 3 and got["ret/image-text/n_captions"] == 6


def test_format_metrics_table():
    table = format_metrics_table({"b/image/top1": 0.5, "b/image/n": 10, "c/text->image/R@1": 0.125})
    lines = table.splitlines()
    assert lines[0] == "b" and "50.00" in lines[1] and lines[2].split()[-1] == "10" and "12.50" in table


# ---------------------------------------------------------------- clip_benchmark, the peer


def clip_benchmark_metrics(export, folder, tmp_path, monkeypatch) -> dict:
    """clip_benchmark's zero-shot classification of an export on a benchmark folder, in process,
    through the entry point the README gives (clip_benchmark 1.6.2 with our NumPy)."""
    from mmcontrast.eval import clip_benchmark_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything it needs is local; prove it
    monkeypatch.setattr("sys.argv", ["clip_benchmark"])
    result = tmp_path / "cb_result.json"
    argv = ["eval", "--dataset", f"wds/{folder.name}", "--dataset_root", str(folder)]
    argv += ["--model", f"local-dir:{export}", "--pretrained", "none", "--model_type", "open_clip"]
    argv += ["--task", "zeroshot_classification", "--output", str(result)]
    argv += ["--no_amp", "--num_workers", "0", "--batch_size", "32", "--quiet"]  # fp32, as mmcontrast eval
    clip_benchmark_cli.main(argv)
    return json.loads(result.read_text())["metrics"]


def test_clip_benchmark_reads_our_folder_and_agrees(tmp_path, monkeypatch):
    from pathlib import Path

    from mmcontrast.data.demo import write_demo_world
    from mmcontrast.eval import evaluate_export
    from mmcontrast.export import export_run
    from tests.export_helpers import make_run_dir

    world = write_demo_world(tmp_path / "world", n_train=0, n_val=72, seed=3, samples_per_shard=36)
    make_run_dir(tmp_path / "run")
    export = export_run(tmp_path / "run", tmp_path / "export")
    folder = Path(next(d for d in world["benchmark_dirs"] if d.endswith("demo-classes")))
    ours = evaluate_export(export, [folder], batch_size=32)
    cb = clip_benchmark_metrics(export, folder, tmp_path, monkeypatch)
    assert ours["demo-classes/image/n"] > 0
    assert cb["acc1"] == pytest.approx(ours["demo-classes/image/top1"], abs=0.005)
    assert cb["acc5"] == pytest.approx(ours["demo-classes/image/top5"], abs=0.005)
    assert cb["mean_per_class_recall"] == pytest.approx(
        ours["demo-classes/image/mean_per_class_recall"], abs=0.005
    )


def _error_on_ranks(rank, world, folder):
    try:
        _run([folder])
    except BenchmarkError as exc:
        return str(exc)
    return "no error"


def test_a_broken_sample_on_one_rank_stops_every_rank(tmp_path):
    """Sample 6 (the broken one) belongs to rank 0 only; rank 1 must not wait for it forever."""
    bh.image_classes(tmp_path / "b", extra=[{"__key__": "bad", "png": bh.png("red"), "cls": "9"}])
    messages = run_ranks(2, _error_on_ranks, str(tmp_path / "b"), timeout=60)
    assert "class 9 is outside the 6 classes" in messages[0]
    assert messages[1].startswith("benchmark b failed on another rank: rank 0: BenchmarkError")
