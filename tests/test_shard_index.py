"""Bounded resume: a shard index lets a resumed loader pass over consumed shards without reading
them, and changes nothing in what the loader yields."""

import json
import os

import pytest

from mmcontrast.data import shard_index
from mmcontrast.data.pipeline import expand_sources
from mmcontrast.data.shard_index import Ref, RefReader, index_shards, read_entry
from mmcontrast.data.tar_events import tar_events
from tests.test_pipeline import _same, broken_shards, cfg, loader, take


def _urls(spec):
    return [u for source in expand_sources(spec) for u in source]


def test_an_entry_replays_exactly_what_the_shard_yields(tmp_path):
    """Good samples, undecodable ones, a cut member, a cut header, a non-tar: the same events."""
    urls, _, _ = broken_shards(tmp_path / "shards")
    report = index_shards(_urls(urls), tmp_path / "index")
    assert report["indexed"] == len(_urls(urls)) and report["skipped"] >= 3
    reader = RefReader()
    for url in _urls(urls):
        want = list(tar_events(url))
        got = [reader.load(e) if isinstance(e, Ref) else e for e in read_entry(tmp_path / "index", url)]
        assert got == want, url
    reader.close()


def test_a_changed_shard_is_not_read_from_a_stale_entry(tmp_path):
    urls, _, _ = broken_shards(tmp_path / "shards")
    url = _urls(urls)[1]
    index_shards([url], tmp_path / "index")
    assert read_entry(tmp_path / "index", url) is not None
    os.utime(url, ns=(1, 1))  # same bytes, other mtime: the entry no longer vouches for it
    assert read_entry(tmp_path / "index", url) is None
    assert read_entry(None, url) is None and read_entry(tmp_path / "index", "http://host/0.tar") is None


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    from mmcontrast.data.demo import write_demo_world

    out = tmp_path_factory.mktemp("sources")
    a = write_demo_world(out / "a", n_train=48, n_val=0, seed=1, samples_per_shard=8)["urls"]["train"]
    b = write_demo_world(out / "b", n_train=24, n_val=0, seed=2, samples_per_shard=6)["urls"]["train"]
    return f"{a}::{b}"


def _count_shard_reads(monkeypatch) -> list[str]:
    opened = []
    real = shard_index.tar_events

    def counting(url, with_offsets=False):
        opened.append(url)
        return real(url, with_offsets)

    monkeypatch.setattr(shard_index, "tar_events", counting)
    return opened


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_with_an_index_reads_no_consumed_shard_and_yields_the_same(
    two_sources, tok, tf, tmp_path, monkeypatch, workers
):
    c = cfg(workers=workers, shuffle_buffer=12, audio_seconds=0.5, train_weights=[2.0, 1.0])
    index = str(tmp_path / "index")
    reference = take(iter(loader(two_sources, c, tok, tf, train=True)), 30)  # two epochs and more
    first = loader(two_sources, c, tok, tf, train=True, index_dir=index)
    it = iter(first)
    assert [b["__key__"] for b in take(it, 24)] == [b["__key__"] for b in reference[:24]]
    state = json.loads(json.dumps(first.state_dict()))
    del it, first
    assert len(os.listdir(index)) >= 10, "the first epoch's shards were indexed as they were read"
    opened = _count_shard_reads(monkeypatch) if workers == 0 else []
    resumed = loader(two_sources, c, tok, tf, train=True, position=state, index_dir=index)
    for got, want in zip(take(iter(resumed), 6), reference[24:], strict=True):
        _same(got, want)
    if workers == 0:  # in-process: every full shard read is seen
        assert opened == [], f"read during the resume: {opened}"
    # and without the index the same resume gives the same batches, reading every shard again
    plain = loader(two_sources, c, tok, tf, train=True, position=state)
    for got, want in zip(take(iter(plain), 6), reference[24:], strict=True):
        _same(got, want)
