"""Negative captions through the shard pipeline: neg.json shards, on-the-fly demo and rule
negatives share one path; broken neg.json costs the negatives, never the sample."""

from __future__ import annotations

import json

import pytest
import torch

from mmcontrast.cli import main
from mmcontrast.data.negatives import write_negative_shards
from tests.test_pipeline import cfg, demo_samples, loader, tf, tok, world, write_shard  # noqa: F401

K = 3


def _all(urls, c, tok, tf, **kw):  # noqa: F811
    return list(loader(urls, c, tok, tf, train=False, **kw))


def test_shard_negatives_equal_on_the_fly_ones(world, tok, tf, tmp_path):  # noqa: F811
    out, manifest = world
    val = str(out / manifest["splits"]["val"]["pattern"])
    report = write_negative_shards(val, tmp_path / "neg", method="demo")
    assert report["samples"] == 20 and report["with_negatives"] == 20 and not report["skipped"]
    written = str(tmp_path / "neg" / manifest["splits"]["val"]["pattern"])
    from_shards = _all(written, cfg(negatives="shard", negatives_per_sample=K), tok, tf)
    on_the_fly = _all(val, cfg(negatives="demo", negatives_per_sample=K), tok, tf)
    assert [b["__key__"] for b in from_shards] == [b["__key__"] for b in on_the_fly]
    for a, b in zip(from_shards, on_the_fly, strict=True):
        assert a["text_negatives"].shape == (len(a["__key__"]), K, 32)
        assert torch.equal(a["text_negatives"], b["text_negatives"])
        assert torch.equal(a["present"]["text_negatives"], b["present"]["text_negatives"])
        assert a["present"]["text_negatives"].any(1).all()
        # a negative is never the caption itself
        same = (a["text_negatives"] == a["text"][:, None, :]).all(-1)
        assert not (same & a["present"]["text_negatives"]).any()


def test_rule_negatives_on_the_fly(world, tok, tf):  # noqa: F811
    out, manifest = world
    val = str(out / manifest["splits"]["val"]["pattern"])
    batches = _all(val, cfg(negatives="rules", negatives_per_sample=2), tok, tf)
    valid = torch.cat([b["present"]["text_negatives"] for b in batches])
    assert valid.shape == (20, 2) and valid[:, 0].all()  # every demo caption can be shuffled


def test_broken_neg_json_is_a_counted_skip_of_the_negatives(tmp_path, tok, tf):  # noqa: F811
    samples = demo_samples("s", 8)
    bad = {0: b"{not json", 1: b'"a string"', 2: b"[1, 2]", 3: b"\xff\xfe"}
    for i, sample in enumerate(samples):
        if i in bad:
            sample["neg.json"] = bad[i]
        elif i != 4:  # sample 4 has none
            sample["neg.json"] = json.dumps(["a wrong caption", "another one"]).encode()
    write_shard(tmp_path / "broken-000000.tar", samples)
    it = loader(
        str(tmp_path / "broken-000000.tar"),
        cfg(negatives="shard", negatives_per_sample=2),
        tok,
        tf,
        train=False,
    )
    batches = list(it)
    assert sum(len(b["__key__"]) for b in batches) == 8  # no sample lost
    valid = torch.cat([b["present"]["text_negatives"] for b in batches])
    assert not valid[:5].any() and valid[5:].all()
    assert it.skipped == {"negatives/bad_neg_json": 4, "negatives/missing_neg_json": 1}
    assert it.skipped_keys == []  # the samples themselves were not skipped


def test_negatives_cli_writes_shards_and_refuses_broken_input(world, tmp_path, capsys):  # noqa: F811
    out, manifest = world
    val = str(out / manifest["splits"]["val"]["pattern"])
    main(["negatives", "--data", val, "--out", str(tmp_path / "neg"), "--method", "rules"])
    report = json.loads(capsys.readouterr().out)
    assert report["with_negatives"] == 20 and len(report["shards"]) == 3
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(SystemExit) as exc:
        main(["negatives", "--data", str(tmp_path / "junk.tar"), "--out", str(tmp_path / "neg2")])
    assert exc.value.code == 1 and "junk.tar" in capsys.readouterr().err
    assert not list((tmp_path / "neg2").glob("*.tar"))  # no half-written shard left behind
    with pytest.raises(SystemExit):
        main(["negatives", "--data", val, "--out", str(out)])  # would overwrite its input
