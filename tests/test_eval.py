"""Eval metrics against hand computation and brute force; export eval against training eval and clip_benchmark."""

import copy
import itertools
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcontrast.data.demo import CLASSES, write_demo_world
from mmcontrast.data.pipeline import make_loader
from mmcontrast.eval import (
    eval_main,
    evaluate,
    evaluate_export,
    evaluate_on_urls,
    format_metrics_table,
    write_clip_benchmark_wds,
)
from mmcontrast.eval import metrics as metrics_mod
from mmcontrast.eval.metrics import class_embeddings, paired_recall, recall_at_k
from mmcontrast.export import export_run
from tests.export_helpers import make_run_dir

# ---------------------------------------------------------------- a model with known embeddings


class TableModel(nn.Module):
    """Every input row holds an integer id; each modality maps ids to fixed vectors."""

    def __init__(self, tables: dict, vocab: dict):
        super().__init__()
        self.tables = {
            m: F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1) for m, v in tables.items()
        }
        self.modalities = list(tables)
        self.embed_dim = next(iter(self.tables.values())).shape[1]
        self.vocab = vocab  # text -> id in the "text" table
        self.anchor = nn.Parameter(torch.zeros(1))  # gives evaluate a device to read

    def tokenizer(self, texts):
        return torch.tensor([[self.vocab[t]] for t in texts])

    def encode(self, modality, x):
        return self.tables[modality][x[:, 0].long()]


def _batch(ids: dict, present=None, meta=None):
    n = len(next(iter(ids.values())))
    batch = {m: torch.tensor(v).view(n, 1) for m, v in ids.items()}
    batch["present"] = {
        m: torch.tensor(present[m]) if present and m in present else torch.ones(n, dtype=torch.bool)
        for m in ids
    }
    batch["__key__"] = [f"s{i}" for i in range(n)]
    batch["meta"] = meta or [None] * n
    return batch


def test_retrieval_recall_by_hand():
    # Sample i has image i and text i.
    model = TableModel(
        {"image": [[1, 0], [0, 1], [0.6, 0.8]], "text": [[0.8, 0.6], [0.6, 0.8], [1, 0]]},
        vocab={},
    )
    # image -> text similarities (rows: images, columns: texts):
    #   i0: .80 .60 1.0  -> its text t0 is 2nd
    #   i1: .60 .80 0.0  -> 1st
    #   i2: .96 1.0 .60  -> 3rd
    # text -> image (columns of the above): t0 -> i0 2nd (.96 beats .80), t1 -> i1 2nd, t2 -> i2 2nd.
    batches = [_batch({"image": [0, 1], "text": [0, 1]}), _batch({"image": [2], "text": [2]})]
    got = evaluate(model, batches, templates=[], class_names=[], ks=(1, 2, 3))
    assert got["retrieval/image->text/R@1"] == pytest.approx(1 / 3)
    assert got["retrieval/image->text/R@2"] == pytest.approx(2 / 3)
    assert got["retrieval/image->text/R@3"] == pytest.approx(1.0)
    assert got["retrieval/text->image/R@1"] == pytest.approx(0.0)
    assert got["retrieval/text->image/R@2"] == pytest.approx(1.0)
    assert got["retrieval/image-text/n"] == 3
    assert not any(k.startswith("zeroshot/") for k in got)  # no templates, no zero-shot


def test_zero_shot_by_hand():
    vocab = {"a red circle.": 0, "the red circle.": 1, "a blue star.": 2, "the blue star.": 3}
    model = TableModel(
        {
            "image": [[0.6, 0.8], [1, 0], [0, 1]],
            "text": [[1, 0], [0.6, 0.8], [0, 1], [0, 1], [0.5, 0.5]],
            "audio": [[0, 1], [1, 0], [1, 0]],
        },
        vocab,
    )
    # Class embeddings: red circle = normalise(mean((1,0), (.6,.8))) = (.894, .447); blue star = (0, 1).
    # image 0 (.6,.8), a red circle: .894 vs .8 -> right (with the first template alone it would be wrong).
    # image 1 (1,0), a blue star: .894 vs 0 -> wrong.  image 2 has two objects: not classified.
    # audio 0 (0,1), red circle: .447 vs 1 -> wrong; audio 1 (1,0), blue star -> wrong.
    one = lambda c, s: {"objects": [{"color": c, "shape": s}]}  # noqa: E731
    meta = [one("red", "circle"), one("blue", "star"), {"objects": [one("red", "circle")["objects"][0]] * 2}]
    batch = _batch({"image": [0, 1, 2], "text": [4, 4, 4], "audio": [0, 1, 2]}, meta=meta)
    got = evaluate(model, [batch], ["a {}.", "the {}."], ["red circle", "blue star"], ks=(1, 2))
    assert got["zeroshot/image/top1"] == pytest.approx(0.5)
    assert got["zeroshot/image/top2"] == pytest.approx(1.0)
    assert got["zeroshot/image/n"] == 2
    assert got["zeroshot/audio/top1"] == pytest.approx(0.0)
    assert "zeroshot/text/top1" not in got
    cls = class_embeddings(
        lambda t: model.encode("text", t), model.tokenizer, ["red circle", "blue star"], ["a {}.", "the {c}."]
    )
    torch.testing.assert_close(cls, torch.tensor([[2 / 5**0.5, 1 / 5**0.5], [0.0, 1.0]]))


def test_absent_modalities_are_left_out():
    model = TableModel(
        {
            "image": [[1, 0], [0, 1], [1, 1]],
            "text": [[1, 0], [0, 1], [0, 1]],
            "audio": [[1, 0], [0, 1], [1, 0]],
        },
        {},
    )
    # Sample 2 has no audio: image-audio and text-audio use samples 0 and 1 only, where all is perfect.
    batch = _batch(
        {"image": [0, 1, 2], "text": [0, 1, 2], "audio": [0, 1, 2]}, present={"audio": [True, True, False]}
    )
    got = evaluate(model, [batch], [], [], ks=(1,))
    assert got["retrieval/image-audio/n"] == got["retrieval/text-audio/n"] == 2
    assert got["retrieval/image-text/n"] == 3
    assert got["retrieval/audio->image/R@1"] == got["retrieval/text->audio/R@1"] == 1.0
    # Texts 1 and 2 share a vector but not an input: image 1 ties them, image 2 ties all three
    # texts, and a tie with a wrong item counts against the query.
    assert got["retrieval/image->text/R@1"] == pytest.approx(1 / 3)


def test_identical_gallery_items_are_interchangeable():
    # Samples 0 and 2 carry the same caption (same text input): retrieving either is right.
    model = TableModel({"image": [[1, 0], [0, 1], [0.9, 0.1]], "text": [[1, 0], [0, 1]]}, {})
    batch = _batch({"image": [0, 1, 2], "text": [0, 1, 0]})
    got = evaluate(model, [batch], [], [], ks=(1,))
    assert got["retrieval/image->text/R@1"] == 1.0
    # The other way the two images differ, so caption 2 -> image 2 loses to image 0.
    assert got["retrieval/text->image/R@1"] == pytest.approx(2 / 3)


def test_collapsed_model_scores_zero():
    model = TableModel({"image": [[1, 0]] * 4, "text": [[0, 1]] * 4}, {})
    got = evaluate(model, [_batch({"image": [0, 1, 2, 3], "text": [0, 1, 2, 3]})], [], [], ks=(1,))
    assert got["retrieval/image->text/R@1"] == got["retrieval/text->image/R@1"] == 0.0


def _brute_force_recall(scores, positives, k):
    hits = 0
    for row, pos in zip(scores.tolist(), positives.tolist(), strict=True):
        ranks = [
            sum(s >= row[j] for s, p in zip(row, pos, strict=True) if not p)
            for j in range(len(row))
            if pos[j]
        ]
        hits += min(ranks) < k
    return hits / len(scores)


def test_recall_matches_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    gal = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    groups = torch.randint(0, 30, (37,), generator=g)  # some duplicate gallery items
    positives = groups[None, :] == groups[:, None]
    want = {k: _brute_force_recall(q @ gal.T, positives, k) for k in (1, 5)}
    assert recall_at_k(q @ gal.T, positives, (1, 5)) == pytest.approx(want)
    monkeypatch.setattr(metrics_mod, "CHUNK", 5)  # chunking must not change the result
    assert paired_recall(q, gal, groups, (1, 5)) == pytest.approx(want)


def test_format_metrics_table():
    table = format_metrics_table(
        {
            "zeroshot/image/top1": 0.5,
            "zeroshot/image/top5": 1.0,
            "zeroshot/image/n": 10,
            "retrieval/image-text/n": 20,
            "retrieval/image->text/R@1": 0.25,
            "retrieval/image->text/R@5": 0.75,
            "retrieval/text->image/R@1": 0.125,
            "retrieval/text->image/R@5": 0.5,
        }
    )
    assert "zero-shot classification" in table and "retrieval" in table
    assert " 50.00 " in table and "100.00" in table and "image->text" in table and " 12.50 " in table


# ---------------------------------------------------------------- on demo data, through an export


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = write_demo_world(root / "world", n_train=0, n_val=72, seed=3, samples_per_shard=36)
    cfg, models = make_run_dir(root / "run")
    export = export_run(root / "run", root / "export")
    return {
        "root": root,
        "urls": manifest["urls"]["val"],
        "cfg": cfg,
        "model": models["step_0000600"],
        "export": export,
    }


def _same_metrics(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), k


def test_export_eval_equals_training_eval(demo, capsys):
    out = demo["root"] / "metrics.json"
    got = eval_main(demo["export"], demo["urls"], out, batch_size=16)
    assert json.loads(out.read_text()) == got
    assert "zero-shot classification" in capsys.readouterr().out
    model, cfg = demo["model"], demo["cfg"]
    model.train()  # evaluate must switch to eval mode itself (BatchNorm) and restore the mode
    want = evaluate_on_urls(model, demo["urls"], cfg, workers=0)  # as the trainer calls it
    assert model.training
    model.eval()
    _same_metrics(got, want, 1e-6)
    assert got["zeroshot/image/n"] == got["zeroshot/audio/n"] > 0
    assert got["retrieval/image-text/n"] == 72
    expected = {
        f"retrieval/{a}->{b}/R@{k}"
        for a in ("image", "text", "audio")
        for b in ("image", "text", "audio")
        if a != b
        for k in (1, 5)
    }
    assert expected <= got.keys()


def _accuracy_without_numpy_scalar(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's accuracy() calls float() on a 1-element 1-D NumPy array, which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"). Same computation with
    .item(); patched into clip_benchmark for this test only, the product keeps its NumPy."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_clip_benchmark_agrees_with_mmcontrast(demo, monkeypatch):
    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_without_numpy_scalar)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything it needs is local; prove it
    root, templates = demo["root"], demo["cfg"].eval.templates
    summary = write_clip_benchmark_wds(
        root / "world", root / "cb", class_names=list(CLASSES), templates=templates
    )
    ours = evaluate_export(
        demo["export"], demo["urls"], batch_size=32, templates=templates, class_names=list(CLASSES)
    )
    assert summary["written"] == ours["zeroshot/image/n"] > 0
    assert (root / "cb" / "zeroshot_classification_templates.txt").read_text().split("\n")[:-1] == [
        t.replace("{}", "{c}") for t in templates
    ]

    result, clf = root / "cb_result.json", root / "cb_clf.pt"
    argv = ["clip_benchmark", "eval", "--dataset", "wds/mmcontrast_demo", "--dataset_root", str(root / "cb")]
    argv += ["--model", f"local-dir:{demo['export']}", "--pretrained", "none", "--model_type", "open_clip"]
    argv += ["--task", "zeroshot_classification", "--output", str(result), "--save_clf", str(clf)]
    argv += ["--no_amp", "--num_workers", "0", "--batch_size", "32", "--quiet"]  # fp32, as mmcontrast eval
    monkeypatch.setattr(sys, "argv", argv)
    cb_cli.main()

    cb = json.loads(result.read_text())["metrics"]
    assert cb["acc1"] == pytest.approx(ours["zeroshot/image/top1"], abs=0.01)
    assert cb["acc5"] == pytest.approx(ours["zeroshot/image/top5"], abs=0.01)
    # The classifier clip_benchmark built from the same names and templates equals ours.
    from mmcontrast.eval.metrics import class_embeddings
    from mmcontrast.export import load_exported

    exported = load_exported(demo["export"])
    with torch.no_grad():
        want = class_embeddings(exported.encode_text, exported.tokenizer, list(CLASSES), templates)
    torch.testing.assert_close(torch.load(clf).T, want, atol=1e-5, rtol=0)


def test_bf16_model_is_evaluated_with_bf16_inputs(demo):
    # A DeepSpeed bf16 module holds bf16 weights: float inputs must follow, as in training.
    model = copy.deepcopy(demo["model"]).to(torch.bfloat16)
    loader = make_loader(
        demo["urls"],
        demo["cfg"].data,
        image_transform=model.val_transform,
        tokenizer=model.tokenizer,
        train=False,
        workers=0,
        batch_size=12,
    )
    got = evaluate(
        model, itertools.islice(loader, 1), demo["cfg"].eval.templates, CLASSES
    )  # bf16 is slow on CPU
    assert got["retrieval/image-text/n"] == 12 and 0.0 <= got["retrieval/audio->image/R@1"] <= 1.0
