"""The shard pipeline: shapes, URL forms, splitting, skips and exact resume."""

import io
import json
import tarfile

import numpy as np
import open_clip
import pytest
import soundfile as sf
import torch
from webdataset import TarWriter

from mmcontrast.config import DataConfig
from mmcontrast.data.audio import AudioDecodeError, decode_audio
from mmcontrast.data.demo import make_sample, write_demo_world
from mmcontrast.data.pipeline import make_loader

CTX = 32


@pytest.fixture(scope="module")
def tok():
    return open_clip.tokenizer.SimpleTokenizer(context_length=CTX)  # vocab ships with open_clip


@pytest.fixture(scope="module")
def tf():
    return open_clip.image_transform(64, is_train=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """48 train samples in 6 shards of 8; 20 val samples in shards of 8, 8, 4."""
    out = tmp_path_factory.mktemp("world")
    return out, write_demo_world(out, n_train=48, n_val=20, seed=0, samples_per_shard=8)


def cfg(**kw):
    base = {"batch_size": 4, "workers": 0, "shuffle_buffer": 10}
    base.update(kw)
    return DataConfig(**base)


def loader(urls, c, tok, tf, **kw):
    return make_loader(urls, c, image_transform=tf, tokenizer=tok, **kw)


def keys_of(batches):
    return [k for b in batches for k in b["__key__"]]


def take(it, n):
    return [next(it) for _ in range(n)]


def write_shard(path, samples):
    with TarWriter(str(path), encoder=False, mtime=0.0) as tw:
        for s in samples:
            tw.write(s)


def demo_samples(prefix, n, seed=0):
    rng = np.random.default_rng(seed)
    return [make_sample(f"{prefix}-{i:02d}", rng) for i in range(n)]


# ---------------------------------------------------------------- basics


def test_batch_shapes_and_fields(world, tok, tf):
    _, m = world
    ld = loader(m["urls"]["val"], cfg(), tok, tf, train=False)
    batches = list(ld)
    assert [len(b["__key__"]) for b in batches] == [4, 4, 4, 4, 4]
    assert sorted(keys_of(batches)) == [f"val-{i:07d}" for i in range(20)]
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["text"].shape == (4, CTX) and b["text"].dtype == torch.long
    assert b["audio"].shape == (4, 16000) and b["audio"].dtype == torch.float32
    assert all(b["present"][m].tolist() == [True] * 4 for m in ("image", "text", "audio"))
    assert set(b["meta"][0]) >= {"objects", "caption_template"}
    assert b["skipped"] == {} and b["skipped_keys"] == []
    assert b["position"] == {"epoch": 0, "rank": 0, "role": 0, "offset": 4}
    assert ld.skipped == {} and ld.skipped_keys == []


def test_only_configured_modalities(world, tok, tf):
    _, m = world
    c = cfg(fields={"image": "png", "text": "txt"})
    b = next(iter(loader(m["urls"]["val"], c, tok, tf, train=False)))
    assert "audio" not in b and set(b["present"]) == {"image", "text"}


def test_brace_plain_glob_and_pipe_urls(world, tok, tf):
    out, m = world
    ref = keys_of(loader(m["urls"]["val"], cfg(), tok, tf, train=False))
    forms = [
        f"{out}/val-000000.tar::{out}/val-000001.tar::{out}/val-000002.tar",
        f"{out}/val-*.tar",
        f"pipe:cat {out}/val-{{000000..000002}}.tar",
    ]
    for urls in forms:
        got = keys_of(loader(urls, cfg(), tok, tf, train=False))
        assert sorted(got) == sorted(ref), urls
    one = keys_of(loader(f"{out}/val-000002.tar", cfg(), tok, tf, train=False))
    assert one == [f"val-{i:07d}" for i in range(16, 20)]
    train = keys_of(loader(m["urls"]["train"], cfg(), tok, tf, train=False))
    assert sorted(train) == [f"train-{i:07d}" for i in range(48)]


def test_workers_0_and_2_see_the_same_data(world, tok, tf):
    _, m = world
    k0 = keys_of(loader(m["urls"]["val"], cfg(), tok, tf, train=False, workers=0))
    k2 = keys_of(loader(m["urls"]["val"], cfg(), tok, tf, train=False, workers=2))
    assert sorted(k0) == sorted(k2) and len(k2) == 20


def test_split_by_node_and_worker(world, tok, tf):
    _, m = world
    per_rank = []
    for rank in (0, 1):
        ld = loader(m["urls"]["train"], cfg(), tok, tf, train=True, rank=rank, world_size=2, workers=2)
        batches = take(iter(ld), 6)  # 3 shards x 8 samples / 4 per batch = one epoch on this rank
        assert all(b["position"]["epoch"] == 0 for b in batches)
        by_role = {0: set(), 1: set()}
        for b in batches:
            by_role[b["position"]["role"]].update(b["__url__"])
        assert by_role[0] and by_role[1] and not by_role[0] & by_role[1]
        per_rank.append((set(keys_of(batches)), by_role[0] | by_role[1]))
    (k0, u0), (k1, u1) = per_rank
    assert not k0 & k1 and len(k0 | k1) == 48
    assert not u0 & u1 and len(u0 | u1) == 6


def test_train_epochs_reshuffle(world, tok, tf):
    _, m = world
    ld = loader(m["urls"]["train"], cfg(), tok, tf, train=True)
    it = iter(ld)
    e0, e1 = take(it, 12), take(it, 12)
    assert [b["position"]["epoch"] for b in e0 + e1] == [0] * 12 + [1] * 12
    assert sorted(keys_of(e0)) == sorted(keys_of(e1)) == [f"train-{i:07d}" for i in range(48)]
    assert keys_of(e0) != keys_of(e1)
    assert ld.state_dict()["epoch"] == 1
    again = take(iter(loader(m["urls"]["train"], cfg(), tok, tf, train=True)), 12)
    assert keys_of(again) == keys_of(e0)  # seeded
    other = take(iter(loader(m["urls"]["train"], cfg(), tok, tf, train=True, seed=1)), 12)
    assert keys_of(other) != keys_of(e0)


def test_resampled(world, tok, tf):
    out, m = world
    c = cfg(resampled=True)
    a = take(iter(loader(m["urls"]["train"], c, tok, tf, train=True, workers=2)), 20)
    b = take(iter(loader(m["urls"]["train"], c, tok, tf, train=True, workers=2)), 20)
    assert keys_of(a) == keys_of(b)
    assert max(x["position"]["epoch"] for x in a) >= 1  # rounds of 3 draws per worker
    # one shard and two workers is fine when resampling: draws are with replacement
    one = take(iter(loader(f"{out}/train-000000.tar", c, tok, tf, train=True, workers=2)), 6)
    assert set(keys_of(one)) <= {f"train-{i:07d}" for i in range(8)}


def test_two_sources_mixed_by_weight(tmp_path, tok, tf):
    write_shard(tmp_path / "a-0.tar", demo_samples("a0", 20, 1))
    write_shard(tmp_path / "a-1.tar", demo_samples("a1", 20, 2))
    write_shard(tmp_path / "b-0.tar", demo_samples("b0", 20, 3))
    urls = f"{tmp_path}/a-{{0..1}}.tar::{tmp_path}/b-0.tar"
    c = cfg(resampled=True, train_weights=[3.0, 1.0], batch_size=10, shuffle_buffer=0)
    keys = keys_of(take(iter(loader(urls, c, tok, tf, train=True)), 40))
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.65 < frac_a < 0.85, frac_a
    # not resampled: one epoch holds every sample of both sources exactly once
    c = cfg(train_weights=[3.0, 1.0], batch_size=4)
    keys = keys_of(take(iter(loader(urls, c, tok, tf, train=True)), 15))
    assert sorted(keys) == sorted(
        [f"a0-{i:02d}" for i in range(20)]
        + [f"a1-{i:02d}" for i in range(20)]
        + [f"b0-{i:02d}" for i in range(20)]
    )
    with pytest.raises(ValueError, match="2 positive weights"):
        loader(urls, cfg(), tok, tf, train=True, weights=[1.0])


# ---------------------------------------------------------------- masks and skips


def test_missing_audio_is_masked_and_single_modality_skipped(tmp_path, tok, tf):
    samples = demo_samples("s", 6)
    del samples[1]["flac"]
    del samples[3]["png"]
    del samples[4]["png"], samples[4]["flac"]  # text alone cannot be contrasted
    write_shard(tmp_path / "m.tar", samples)
    ld = loader(str(tmp_path / "m.tar"), cfg(batch_size=5), tok, tf, train=False)
    (b,) = list(ld)
    assert b["__key__"] == ["s-00", "s-01", "s-02", "s-03", "s-05"]
    assert b["present"]["audio"].tolist() == [True, False, True, True, True]
    assert b["present"]["image"].tolist() == [True, True, True, False, True]
    assert b["present"]["text"].all()
    assert b["audio"][1].abs().sum() == 0 and b["image"][3].abs().sum() == 0
    assert b["audio"][0].abs().sum() > 0
    assert ld.skipped == {"too_few_modalities": 1} and ld.skipped_keys == ["s-04"]


def test_skipped_keys_go_to_a_file_as_they_come(tmp_path, tok, tf):
    """The trainer's loader appends skipped keys to its rank's file (memory stays flat over a long
    run and the keys outlive a resume); the counts stay in memory."""
    samples = demo_samples("s", 6)
    del samples[2]["png"], samples[2]["flac"]
    del samples[4]["png"], samples[4]["flac"]
    write_shard(tmp_path / "m.tar", samples)
    ld = loader(str(tmp_path / "m.tar"), cfg(batch_size=4), tok, tf, train=False)
    keys_file = tmp_path / "run" / "skipped_keys" / "rank0.txt"
    ld.write_skipped_keys_to(keys_file)
    for _ in range(2):  # two passes: the file keeps both
        list(ld)
    assert ld.skipped == {"too_few_modalities": 2} and ld.skipped_keys == []
    assert keys_file.read_text().splitlines() == ["s-02", "s-04"] * 2


def _truncate(path, key, ext, into_header=False):
    """Cut a shard inside the data (or the header) of member key.ext."""
    with tarfile.open(path) as t:
        member = t.getmember(f"{key}.{ext}")
    cut = member.offset + 100 if into_header else member.offset_data + member.size // 2
    path.write_bytes(path.read_bytes()[:cut])


@pytest.fixture
def broken(tmp_path):
    return broken_shards(tmp_path)


def broken_shards(tmp_path):
    """Shards with one of each kind of damage; returns (urls, {skipped key: reason}, good keys)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    a = demo_samples("a", 10, 1)
    a[2]["png"] = b"\x89PNG\r\n\x1a\n but not really"
    a[4]["flac"] = b"fLaC" + bytes(200)
    del a[6]["txt"]
    a[7]["txt"] = b"  \n\t "
    a[8]["txt"] = b"\xff\xfe\xfa"
    write_shard(tmp_path / "s-0.tar", a)
    write_shard(tmp_path / "s-1.tar", demo_samples("b", 6, 2))
    _truncate(tmp_path / "s-1.tar", "b-05", "png")  # cut in the middle of a member's data
    write_shard(tmp_path / "s-2.tar", demo_samples("c", 5, 3))
    _truncate(tmp_path / "s-2.tar", "c-04", "txt", into_header=True)  # cut inside a header
    (tmp_path / "s-3.tar").write_bytes(b"this is not a tar file" * 50)
    expected = {
        "a-02": "bad_image",
        "a-04": "bad_audio",
        "a-06": "missing_caption",
        "a-07": "empty_caption",
        "a-08": "bad_caption",
        "b-05": "truncated_tar",
        "c-04": "truncated_tar",
        f"{tmp_path}/s-3.tar": "bad_shard",
    }
    good = (
        [f"a-{i:02d}" for i in (0, 1, 3, 5, 9)]
        + [f"b-{i:02d}" for i in range(5)]
        + [f"c-{i:02d}" for i in range(4)]
    )
    return f"{tmp_path}/s-{{0..3}}.tar", expected, good


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_samples_are_skipped_and_counted(broken, tok, tf, workers):
    urls, expected, good = broken
    ld = loader(urls, cfg(batch_size=3), tok, tf, train=False, workers=workers)
    batches = list(ld)
    assert sorted(keys_of(batches)) == sorted(good)
    assert sorted(ld.skipped_keys) == sorted(expected)
    counts = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert ld.skipped == counts
    for b in batches:
        assert all(p.all() for p in b["present"].values())


def test_trailing_skips_reach_the_main_process(tmp_path, tok, tf):
    s = demo_samples("t", 6)
    s[4]["png"] = b"junk"
    s[5]["txt"] = b""
    write_shard(tmp_path / "t-0.tar", demo_samples("u", 4, 5))
    write_shard(tmp_path / "t-1.tar", s)  # the bad ones end the last shard
    urls = f"{tmp_path}/t-{{0..1}}.tar"
    for workers in (0, 2):
        ld = loader(urls, cfg(batch_size=2), tok, tf, train=False, workers=workers)
        batches = list(ld)
        assert sorted(keys_of(batches)) == [f"t-{i:02d}" for i in range(4)] + [f"u-{i:02d}" for i in range(4)]
        assert sum(sum(b["skipped"].values()) for b in batches) == 0  # both came after the last batch
        assert ld.skipped == {"bad_image": 1, "empty_caption": 1}
        assert sorted(ld.skipped_keys) == ["t-04", "t-05"]
    # training drops the partial batch but still reports the skips behind it
    ld = loader(urls, cfg(batch_size=3, shuffle_buffer=0), tok, tf, train=True, workers=2)
    take(iter(ld), 3)  # epoch 0 is 1 batch (t) + 1 batch (u); the third batch is in epoch 1
    assert ld.skipped == {"bad_image": 1, "empty_caption": 1}


# ---------------------------------------------------------------- refusals


def test_too_few_shards_is_a_clear_error(world, tok, tf):
    out, m = world
    with pytest.raises(
        ValueError, match=r"3 shards.*gets 3, fewer than its 4 data worker.*data\.resampled=true"
    ):
        loader(m["urls"]["val"], cfg(), tok, tf, train=True, workers=4)
    with pytest.raises(ValueError, match=r"over 2 rank\(s\) this rank gets 1"):
        loader(m["urls"]["val"], cfg(), tok, tf, train=True, workers=2, rank=1, world_size=2)
    # evaluation simply uses fewer workers
    ld = loader(f"{out}/val-{{000000..000001}}.tar", cfg(), tok, tf, train=False, workers=3)
    assert ld.roles == 2 and len(keys_of(ld)) == 16
    with pytest.raises(ValueError, match="no shards match"):
        loader(f"{out}/nothing-*.tar", cfg(), tok, tf, train=False)
    with pytest.raises(ValueError, match="do not exist"):
        loader(f"{out}/val-{{000000..000009}}.tar", cfg(), tok, tf, train=False)
    with pytest.raises(ValueError, match="no shard URLs"):
        loader("", cfg(), tok, tf, train=False)


def test_empty_epoch_raises_instead_of_spinning(world, tok, tf):
    _, m = world
    ld = loader(m["urls"]["val"], cfg(batch_size=64), tok, tf, train=True)
    with pytest.raises(RuntimeError, match="produced no batch"):
        next(iter(ld))


def test_position_must_match_the_loader(world, tok, tf, caplog):
    _, m = world
    ld = loader(m["urls"]["train"], cfg(), tok, tf, train=True, workers=2)
    state = ld.state_dict()
    with pytest.raises(ValueError, match="roles=2, now 1"):
        loader(m["urls"]["train"], cfg(), tok, tf, train=True, workers=0, position=state)
    with pytest.raises(ValueError, match="rank=0, now 1"):
        loader(
            m["urls"]["train"], cfg(), tok, tf, train=True, workers=2, position=state, rank=1, world_size=2
        )
    with caplog.at_level("WARNING", logger="mmcontrast.data.pipeline"):
        loader(m["urls"]["train"], cfg(), tok, tf, train=True, workers=2, position=state)
        assert not caplog.records
        loader(m["urls"]["train"], cfg(batch_size=8), tok, tf, train=True, workers=2, position=state)
        assert "not exactly" in caplog.text


# ---------------------------------------------------------------- exact resume


def _same(a, b):
    assert a["__key__"] == b["__key__"]
    assert a["position"] == b["position"]
    for m in ("image", "text", "audio"):
        assert torch.equal(a[m], b[m]), m
        assert torch.equal(a["present"][m], b["present"][m])


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """36 samples in shards of 8,8,8,8,4: workers get unequal shares, so one finishes first."""
    out = tmp_path_factory.mktemp("uneven")
    return write_demo_world(out, n_train=36, n_val=0, seed=1, samples_per_shard=8)["urls"]["train"]


@pytest.mark.parametrize(
    "workers,resampled,cuts",
    [(0, False, [3, 9, 10]), (2, False, [3, 7, 8, 9, 10, 17]), (2, True, [5, 14])],
)
def test_resume_is_exact(uneven, tok, tf, workers, resampled, cuts):
    # 0.5 s crops out of 1 s clips: the random crop must replay too
    c = cfg(workers=workers, resampled=resampled, audio_seconds=0.5)
    ref = take(iter(loader(uneven, c, tok, tf, train=True)), max(cuts) + 6)
    assert len({b["position"]["epoch"] for b in ref}) >= 2  # crosses an epoch boundary
    for k in cuts:
        first = loader(uneven, c, tok, tf, train=True)
        it = iter(first)
        take(it, k)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        del it, first  # as after SIGKILL: nothing of the old loader survives
        resumed = loader(uneven, c, tok, tf, train=True, position=state)
        for got, want in zip(take(iter(resumed), 6), ref[k : k + 6], strict=True):
            _same(got, want)


def test_resume_keeps_skip_totals(broken, tok, tf):
    urls, expected, _ = broken
    c = cfg(batch_size=2, workers=2, shuffle_buffer=4)
    ref_loader = loader(urls, c, tok, tf, train=True)
    ref = take(iter(ref_loader), 14)  # past the first epoch: every skip reported once
    assert sum(ref_loader.skipped.values()) >= len(expected)  # at most 7 batches per epoch
    first = loader(urls, c, tok, tf, train=True)
    take(iter(first), 5)
    resumed = loader(urls, c, tok, tf, train=True, position=first.state_dict())
    for got, want in zip(take(iter(resumed), 9), ref[5:], strict=True):
        _same(got, want)
    assert resumed.skipped == ref_loader.skipped


# ---------------------------------------------------------------- audio decoding


def _wav(wave, sr):
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_decode_audio_resamples_mixes_crops_and_pads():
    sr = 44100
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, tone], axis=1).astype(np.float32)
    out = decode_audio(_wav(stereo, sr), 16000, 16000)
    assert out.shape == (16000,) and out.dtype == torch.float32
    spec = np.abs(np.fft.rfft(out.numpy()[1000:15000]))
    assert abs(np.argmax(spec) * 16000 / 14000 - 440) < 3
    assert abs(out[1000:15000].pow(2).mean().sqrt().item() - 0.5 / np.sqrt(2)) < 0.01
    # start crop for eval, seeded random crop for training, zero padding when short
    ramp = np.linspace(-1, 1, 16000, dtype=np.float32)
    assert torch.allclose(decode_audio(_wav(ramp, 16000), 16000, 8000), torch.from_numpy(ramp[:8000]))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = decode_audio(_wav(ramp, 16000), 16000, 8000, generator=g1)
    assert torch.equal(a, decode_audio(_wav(ramp, 16000), 16000, 8000, generator=g2))
    start = int(np.argmin(np.abs(ramp - a[0].item())))
    assert torch.allclose(a, torch.from_numpy(ramp[start : start + 8000]))
    padded = decode_audio(_wav(ramp[:100], 16000), 16000, 300)
    assert padded.shape == (300,) and padded[100:].abs().sum() == 0
    with pytest.raises(AudioDecodeError, match="cannot decode"):
        decode_audio(b"RIFF nonsense", 16000, 16000)


# ---------------------------------------------------------------- uint8 images, normalised on the device


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_images_normalised_on_the_device_equal_the_float_pipeline(world, tok, workers):
    """The trainer's loader stops open_clip's train transform at uint8 and normalises the batch in
    to_device: bitwise the images of the full float transform (same seeded crops), in fp32 and
    after the bf16 cast, with a quarter of the bytes through the workers."""
    from mmcontrast.data.image import split_device_normalize
    from mmcontrast.train.loop import to_device

    out, _ = world
    full = open_clip.image_transform(64, is_train=True)
    stops_at_uint8, normalize = split_device_normalize(full)
    assert normalize is not None
    urls = f"{out}/train-{{000000..000005}}.tar"
    c = cfg(workers=workers)
    floats = take(iter(loader(urls, c, tok, full, train=True)), 3)
    uint8s = take(iter(loader(urls, c, tok, stops_at_uint8, train=True)), 3)
    for a, b in zip(floats, uint8s, strict=True):
        assert a["__key__"] == b["__key__"]
        assert a["image"].dtype == torch.float32 and b["image"].dtype == torch.uint8
        for dtype in (torch.float32, torch.bfloat16):
            want = to_device(a, torch.device("cpu"), dtype)["image"]
            got = to_device(b, torch.device("cpu"), dtype, normalize)["image"]
            assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="uint8 images but no normalisation"):
        to_device(uint8s[0], torch.device("cpu"), torch.float32)


def test_split_device_normalize_leaves_other_transforms_alone():
    from torchvision import transforms as T

    from mmcontrast.data.image import split_device_normalize

    no_normalize = T.Compose([T.Resize(8), T.ToTensor()])
    assert split_device_normalize(no_normalize) == (no_normalize, None)
    plain = open_clip.image_transform(64, is_train=False).transforms[0]
    assert split_device_normalize(plain) == (plain, None)


def test_missing_image_zeros_keep_the_uint8_dtype(tmp_path, tok):
    from mmcontrast.data.image import split_device_normalize

    samples = demo_samples("s", 4)
    del samples[2]["png"]
    write_shard(tmp_path / "m.tar", samples)
    stops_at_uint8, _ = split_device_normalize(open_clip.image_transform(64, is_train=False))
    (b,) = list(loader(str(tmp_path / "m.tar"), cfg(), tok, stops_at_uint8, train=False))
    assert b["image"].dtype == torch.uint8 and b["image"][2].abs().sum() == 0
    assert b["present"]["image"].tolist() == [True, True, False, True]
