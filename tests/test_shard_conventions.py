"""Real shard conventions: captions in JSON keys, odd image modes, bombs, unreachable shards.

Shards are written here in the layouts img2dataset and LAION-audio publish, so training reads them
as they are, without a conversion step.
"""

import functools
import http.server
import io
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import open_clip
import pytest
import soundfile as sf
import torch
import yaml
from PIL import Image, ImageFile
from webdataset import TarWriter

from mmcontrast.config import ConfigError, DataConfig, load_config
from mmcontrast.data.fields import FieldRef, captions_from_sample, parse_field_spec
from mmcontrast.data.image import ImageDecodeError, ImageTooLargeError, decode_image
from mmcontrast.data.pipeline import check_shard_urls, make_loader

CTX = 32
TEXT = "txt;json:caption;json:text"


@pytest.fixture(scope="module")
def tok():
    return open_clip.tokenizer.SimpleTokenizer(context_length=CTX)


@pytest.fixture(scope="module")
def tf():
    return open_clip.image_transform(32, is_train=False)


def write_shard(path, samples):
    with TarWriter(str(path), encoder=False, mtime=0.0) as tw:
        for s in samples:
            tw.write(s)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def flac_48k_stereo(seconds: float, freq: float) -> bytes:
    t = np.arange(int(48000 * seconds)) / 48000
    wave = 0.3 * np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), 48000, format="FLAC")
    return buf.getvalue()


def img2dataset_sample(i: int, with_txt: bool) -> dict:
    """As img2dataset writes one: jpg, json metadata holding the caption, txt only if asked."""
    caption = f"a photo of object number {i}"
    colour = ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)
    meta = {
        "caption": caption,
        "url": f"https://example.com/{i}.jpg",
        "key": f"{i:09d}",
        "status": "success",
        "error_message": None,
        "width": 40,
        "height": 30,
        "original_width": 400,
        "original_height": 300,
        "exif": "{}",
        "sha256": "0" * 64,
    }
    sample = {
        "__key__": f"{i:09d}",
        "jpg": encode(Image.new("RGB", (40, 30), colour), "JPEG"),
        "json": json.dumps(meta).encode(),
    }
    if with_txt:
        sample["txt"] = f"the txt caption of {i}".encode()
    return sample


def laion_audio_sample(i: int) -> dict:
    """As LAION-audio-630k ships one: 48 kHz stereo flac and a json whose text is a caption list."""
    meta = {
        "text": [f"a tone of {100 + i} hertz", f"sound number {i} humming", f"a steady hum, clip {i}"],
        "tag": ["tone", "hum"],
        "original_data": {"title": f"clip {i}", "license": "CC0"},
    }
    return {
        "__key__": f"audio_{i:05d}",
        "flac": flac_48k_stereo(1.2, 100 + 20 * i),
        "json": json.dumps(meta).encode(),
    }


@pytest.fixture(scope="module")
def img_shards(tmp_path_factory):
    """24 img2dataset samples in 4 shards; every third has a txt (which comes first in TEXT)."""
    out = tmp_path_factory.mktemp("img2dataset")
    for s in range(4):
        write_shard(
            out / f"{s:05d}.tar", [img2dataset_sample(i, i % 3 == 0) for i in range(6 * s, 6 * s + 6)]
        )
    return f"{out}/{{00000..00003}}.tar"


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    """24 LAION-audio samples in 4 shards."""
    out = tmp_path_factory.mktemp("laion_audio")
    for s in range(4):
        write_shard(out / f"{s}.tar", [laion_audio_sample(i) for i in range(6 * s, 6 * s + 6)])
    return f"{out}/{{0..3}}.tar"


def data_cfg(fields, **kw):
    return DataConfig(**{"fields": fields, "batch_size": 4, "workers": 0, "shuffle_buffer": 8, **kw})


AUDIO_FIELDS = {"audio": "flac", "text": TEXT}
IMAGE_FIELDS = {"image": "jpg", "text": TEXT}


def take(it, n):
    return [next(it) for _ in range(n)]


def captions_by_tokens(tok, captions) -> dict:
    return {tuple(tok([c])[0].tolist()): c for c in captions}


def drawn(batches, tok, meta_captions) -> dict:
    """key -> the caption each sample's text tokens spell (every one must be a known caption)."""
    out = {}
    for b in batches:
        for key, tokens in zip(b["__key__"], b["text"], strict=True):
            lookup = captions_by_tokens(tok, meta_captions[key])
            assert tuple(tokens.tolist()) in lookup, key
            out[key] = lookup[tuple(tokens.tolist())]
    return out


# ---------------------------------------------------------------- field specs


def test_parse_field_spec():
    assert parse_field_spec(" TXT; json:Caption ;;json:text") == [
        FieldRef("txt", None),
        FieldRef("json", "Caption"),
        FieldRef("json", "text"),
    ]
    for bad in ("json:", ":caption"):
        with pytest.raises(ValueError, match="ext:key"):
            parse_field_spec(bad)


def test_captions_from_sample_tries_entries_in_order():
    refs = parse_field_spec(TEXT)

    def caps(lines=False, **fields):
        raw = {
            "__key__": "k",
            **{ext: v if isinstance(v, bytes) else json.dumps(v).encode() for ext, v in fields.items()},
        }
        return captions_from_sample(raw, refs, lines=lines)

    assert caps(txt=b" a txt \n", json={"caption": "c"}) == ["a txt"]
    assert caps(json={"caption": " c ", "text": ["t"]}) == ["c"]
    assert caps(json={"text": ["one", " ", "two "]}) == ["one", "two"]
    # an empty list, a null or a missing key move on to the next entry
    assert caps(json={"caption": [], "text": "t"}) == ["t"]
    assert caps(json={"caption": None, "text": ["t"]}) == ["t"]
    assert caps(txt=b"  ", json={"text": "t"}) == ["t"]
    assert caps(json={"url": "u"}) is None and caps(jpg=b"x") is None
    assert caps(txt=b" ", json={"caption": ["", " "]}) == []  # present, but blank
    assert caps(txt=b"first\n\n second \n") == ["first\n\n second"]
    assert caps(lines=True, txt=b"first\n\n second \n") == ["first", "second"]
    for fields, needle in [
        ({"txt": b"\xff\xfe"}, "'txt'.*not UTF-8"),
        ({"json": b"{not json"}, "'json'.*not valid JSON"),
        ({"json": {"caption": 5}}, "'json:caption'.*holds 5"),
        ({"json": {"caption": ["ok", 3]}}, r"'json:caption'.*holds \['ok', 3\]"),
    ]:
        with pytest.raises(ValueError, match=needle):
            caps(**fields)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.fields.text=json", "data.fields.text: bad value 'json'.*name the key.*json:caption"),
        ("data.fields.text=txt;json", "data.fields.text: bad value 'txt;json'.*json:caption"),
        ("data.fields.image=json:url", "data.fields.image: bad value 'json:url'.*text only"),
        ("data.fields.audio=flac:x", "data.fields.audio"),
        ("data.max_image_pixels=-1", "data.max_image_pixels"),
    ],
)
def test_unreadable_field_specs_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])
    assert load_config(None, [f"data.fields.text={TEXT}"]).data.fields["text"] == TEXT


def test_raw_json_text_field_is_refused_by_the_loader_too(img_shards, tok, tf):
    with pytest.raises(ValueError, match="data.fields.text.*json:caption"):
        make_loader(
            img_shards,
            data_cfg({"image": "jpg", "text": "json"}),
            image_transform=tf,
            tokenizer=tok,
            train=False,
        )


# ---------------------------------------------------------------- overrides


def test_override_of_a_mapping_entry_keeps_the_others(tmp_path):
    defaults = DataConfig().fields
    cfg = load_config(None, ["data.fields.image=jpg"])
    assert cfg.data.fields == {**defaults, "image": "jpg"}
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("data:\n  fields: {image: png, text: txt, audio: wav}\n  batch_size: 8\n")
    cfg = load_config(yaml_path, ["data.fields.image=jpg", "data.batch_size=4"])
    assert cfg.data.fields == {"image": "jpg", "text": "txt", "audio": "wav"} and cfg.data.batch_size == 4
    # through base: too
    (tmp_path / "child.yaml").write_text("base: run.yaml\ntrain:\n  steps: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["data.fields.text=txt;json:caption"])
    assert cfg.data.fields == {"image": "png", "text": "txt;json:caption", "audio": "wav"}
    # null removes an entry; a whole mapping replaces the map; null on a section field sets None
    assert load_config(yaml_path, ["data.fields.audio=null"]).data.fields == {"image": "png", "text": "txt"}
    replaced = load_config(yaml_path, ["data.fields={image: jpg, text: txt}"])
    assert replaced.data.fields == {"image": "jpg", "text": "txt"}
    cfg = load_config(yaml_path, ["data.fields.audio=null", "model.audio=null"])
    assert cfg.model.audio is None and cfg.modalities == ["image", "text"]
    with pytest.raises(ConfigError, match="did you mean 'fields'"):
        load_config(yaml_path, ["data.feilds.image=jpg"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(yaml_path, ["data.batch_sise=null"])


# ---------------------------------------------------------------- captions through the loader


def test_img2dataset_shards_give_the_json_caption(img_shards, tok, tf):
    ld = make_loader(img_shards, data_cfg(IMAGE_FIELDS), image_transform=tf, tokenizer=tok, train=False)
    batches = list(ld)
    assert ld.skipped == {}
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(24)]
    for b in batches:
        assert b["image"].shape == (len(b["__key__"]), 3, 32, 32)
        for key, tokens, meta in zip(b["__key__"], b["text"], b["meta"], strict=True):
            i = int(key)
            want = f"the txt caption of {i}" if i % 3 == 0 else meta["caption"]
            assert torch.equal(tokens, tok([want])[0]), key
    # without the json entry, the samples lacking a txt have no caption
    ld = make_loader(
        img_shards, data_cfg({"image": "jpg", "text": "txt"}), image_transform=tf, tokenizer=tok, train=False
    )
    assert len([k for b in ld for k in b["__key__"]]) == 8 and ld.skipped == {"missing_caption": 16}


def test_laion_audio_caption_lists(audio_shards, tok):
    metas = {f"audio_{i:05d}": laion_audio_sample(i)["json"] for i in range(24)}
    lists = {k: json.loads(v)["text"] for k, v in metas.items()}
    ev = make_loader(audio_shards, data_cfg(AUDIO_FIELDS), image_transform=None, tokenizer=tok, train=False)
    batches = list(ev)
    assert batches[0]["audio"].shape == (4, 16000) and ev.skipped == {}
    assert drawn(batches, tok, lists) == {k: v[0] for k, v in lists.items()}  # evaluation: the first

    def epochs(seed):
        ld = make_loader(
            audio_shards, data_cfg(AUDIO_FIELDS), image_transform=None, tokenizer=tok, train=True, seed=seed
        )
        batches = take(iter(ld), 12)  # two epochs of 6 batches
        assert [b["position"]["epoch"] for b in batches] == [0] * 6 + [1] * 6
        return drawn(batches[:6], tok, lists), drawn(batches[6:], tok, lists)

    e0, e1 = epochs(0)
    assert set(e0) == set(e1) == set(lists)
    assert sum(e0[k] != e1[k] for k in lists) >= 6  # a fresh draw each epoch (2/3 differ on average)
    assert sum(e0[k] != lists[k][0] for k in lists) >= 6  # not always the first caption
    assert epochs(0) == (e0, e1)  # seeded: the same draws again
    assert epochs(1) != (e0, e1)


@pytest.mark.parametrize("workers,cut", [(0, 4), (2, 3), (2, 8)])
def test_drawn_captions_replay_on_resume(audio_shards, tok, workers, cut):
    c = data_cfg(AUDIO_FIELDS, workers=workers)

    def fresh(**kw):
        return make_loader(audio_shards, c, image_transform=None, tokenizer=tok, train=True, **kw)

    ref = take(iter(fresh()), cut + 6)  # crosses into the next epoch
    first = fresh()
    take(iter(first), cut)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = take(iter(fresh(position=state)), 6)
    for got, want in zip(resumed, ref[cut:], strict=True):
        assert got["__key__"] == want["__key__"] and got["position"] == want["position"]
        assert torch.equal(got["text"], want["text"])
        assert torch.equal(got["audio"], want["audio"])


# ---------------------------------------------------------------- images


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (CRC fixed up): a decompression bomb's header."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def rgb(data: bytes, max_pixels: int = 0) -> np.ndarray:
    image = decode_image(data, max_pixels)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(
    "mode,fmt,mid,top",
    [
        ("I;16", "PNG", 32768, 65535),
        ("I;16B", "TIFF", 32768, 65535),
        ("I", "TIFF", 32768, 65535),
        ("F", "TIFF", 0.5, 1.0),
    ],
)
def test_deep_grey_is_scaled_not_clipped(mode, fmt, mid, top):
    ramp = np.linspace(0, top, 256)
    values = np.stack([ramp, np.full(256, mid)]).astype({"F": np.float32, "I": np.int32}.get(mode, np.uint16))
    image = Image.fromarray(values.astype(">u2") if mode == "I;16B" else values)
    assert image.mode == mode
    out = rgb(encode(image, fmt))
    assert (out[..., 0] == out[..., 2]).all()
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and (np.diff(out[0, :, 0]) >= 0).all()
    assert abs(out[0, 128, 0] - 128) <= 1
    assert abs(out[1, :, 0] - 128).max() <= 1  # PIL's own convert("RGB") clips this to 255


def test_transparency_is_composited_onto_white():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.putpixel((1, 0), 1)
    out = rgb(encode(pal, "PNG", transparency=0))  # index 0 (black) is transparent
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]
    la = Image.frombytes("LA", (3, 1), bytes([0, 0, 0, 255, 0, 128]))  # black: clear, opaque, half
    out = rgb(encode(la, "PNG"))
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [0] * 3 and abs(out[0, 2, 0] - 127) <= 1
    rgba = Image.new("RGBA", (1, 1), (0, 0, 255, 0))
    assert rgb(encode(rgba, "PNG"))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_one_bit_and_8bit_grey():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red ink
    out = rgb(encode(cmyk, "JPEG", quality=95))
    assert np.abs(out - [255, 0, 0]).max() <= 8
    assert rgb(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG")).min() >= 250  # no ink: white
    assert rgb(encode(Image.new("1", (8, 8), 1), "PNG")).min() == 255
    assert rgb(encode(Image.new("L", (8, 8), 90), "PNG")).max() == 90
    assert rgb(encode(Image.fromarray(np.full((2, 2), 77, np.int32)), "TIFF")).max() == 77  # I, 8-bit range


def test_size_is_checked_before_decoding(monkeypatch):
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self)
    )
    with pytest.raises(ImageTooLargeError, match="10000x10000.*data.max_image_pixels"):
        decode_image(png_header_claiming(10_000, 10_000), 89_478_485)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):  # PIL's own bomb error
        decode_image(png_header_claiming(30_000, 30_000), 0)
    small = encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG")
    with pytest.raises(ImageTooLargeError, match="40x30 = 1200 pixels"):
        decode_image(small, 1199)
    assert decoded == []
    assert decode_image(small, 1200).size == (40, 30) and decode_image(small, 0).size == (40, 30)
    assert decoded and set(decoded) == {(40, 30)}  # the hook does see decoding
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"\x89PNG\r\n\x1a\n not really", 0)
    assert not isinstance(err.value, ImageTooLargeError)


def test_broken_and_odd_inputs_in_a_shard(tmp_path, tok, tf):
    def sample(key, image_ext, image, caption="a caption"):
        meta = {"caption": caption, "url": "u"}
        return {"__key__": key, image_ext: image, "json": json.dumps(meta).encode()}

    grey16 = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0])
    samples = [
        sample("ok", "jpg", encode(Image.new("RGB", (8, 8), (128, 128, 128)), "JPEG", quality=100)),
        sample("grey16", "png", encode(grey16, "PNG")),
        sample("palette", "png", encode(pal, "PNG", transparency=0)),
        sample("cmyk", "jpg", encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG")),
        sample("la", "png", encode(Image.new("LA", (8, 8), (0, 0)), "PNG")),
        sample("bomb", "png", png_header_claiming(30_000, 30_000)),
        sample("huge", "png", png_header_claiming(10_000, 10_000)),
        sample("number", "jpg", encode(Image.new("RGB", (8, 8)), "JPEG"), caption=5),
        sample("mixed", "jpg", encode(Image.new("RGB", (8, 8)), "JPEG"), caption=["fine", None]),
    ]
    write_shard(tmp_path / "odd.tar", samples)
    c = data_cfg({"image": "png;jpg", "text": "json:caption"}, batch_size=16)
    ld = make_loader(str(tmp_path / "odd.tar"), c, image_transform=tf, tokenizer=tok, train=False)
    (batch,) = list(ld)
    assert batch["__key__"] == ["ok", "grey16", "palette", "cmyk", "la"]
    assert ld.skipped == {"too_large_image": 2, "bad_caption": 2}
    assert sorted(ld.skipped_keys) == ["bomb", "huge", "mixed", "number"]
    mid, white = tf(Image.new("RGB", (8, 8), (128,) * 3)), tf(Image.new("RGB", (8, 8), (255,) * 3))
    assert torch.allclose(batch["image"][1], mid, atol=0.02)  # not the clipped near-white
    assert all(torch.allclose(batch["image"][i], white, atol=0.02) for i in (2, 3, 4))


# ---------------------------------------------------------------- shard URL checks


def test_local_and_pipe_urls_are_checked(tmp_path):
    for name in ("a-0.tar", "a-1.tar"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a-2.tar").mkdir()
    check_shard_urls(f"{tmp_path}/a-{{0..1}}.tar::pipe:cat {tmp_path}/a-0.tar", "data.train")
    check_shard_urls(f"file:{tmp_path}/a-0.tar::pipe:FOO=1 cat {tmp_path}/a-1.tar", "data.train")
    with pytest.raises(ValueError) as err:
        check_shard_urls(f"{tmp_path}/a-{{0..4}}.tar", "data.train")
    msg = str(err.value)
    assert msg.startswith("data.train: 3 of 5 shards cannot be read")
    assert f"{tmp_path}/a-2.tar (not a regular file)" in msg and f"{tmp_path}/a-4.tar (no such file)" in msg
    with pytest.raises(ValueError, match=r"data.train: 1 of 2 shards.*'no-such-program-xyz' is not on PATH"):
        check_shard_urls(f"{tmp_path}/a-0.tar::pipe:no-such-program-xyz s3://b/x.tar", "data.train")
    with pytest.raises(ValueError, match="data.train: no shards match"):
        check_shard_urls(f"{tmp_path}/b-*.tar", "data.train")
    with pytest.raises(ValueError, match="data.train is empty"):
        check_shard_urls(" ", "data.train")


def _check_on_nodes(rank, world, urls, local_ranks, blind_rank):
    from mmcontrast.data import pipeline

    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    calls = []
    original = pipeline.check_shard_urls

    def counted(*args):
        calls.append(args)
        return original(*args)

    pipeline.check_shard_urls = counted
    if rank == blind_rank:  # this node cannot see the shards
        pipeline._local_problem = lambda path: "no such file"
    try:
        pipeline.check_shard_urls_on_each_node(urls, "data.train")
        return [len(calls), None]
    except ValueError as exc:
        return [len(calls), str(exc)]


@pytest.mark.parametrize(
    ("local_ranks", "blind_rank", "checks"),
    [((0, 1), None, [1, 0]), ((0, 1), 0, [1, 0]), ((0, 0), 1, [1, 1])],
    ids=["one-node-fine", "one-node-blind", "second-node-blind"],
)
def test_each_node_checks_the_shards_once_and_every_rank_learns_the_outcome(
    tmp_path, local_ranks, blind_rank, checks
):
    from tests.distributed import run_ranks

    for name in ("a-0.tar", "a-1.tar"):
        (tmp_path / name).write_bytes(b"x")
    results = run_ranks(2, _check_on_nodes, f"{tmp_path}/a-{{0..1}}.tar", local_ranks, blind_rank)
    assert [r[0] for r in results] == checks  # local rank 0 of each node checks, the others do not
    errors = [r[1] for r in results]
    if blind_rank is None:
        assert errors == [None, None]
    else:  # every rank raises the blind node's error, even the rank whose node sees the shards
        assert errors[0] == errors[1] and errors[0].startswith("data.train: 2 of 2 shards cannot be read")
        assert f"(seen on {socket.gethostname()})" in errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc=None, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"http.server exited: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def served(tmp_path):
    """`python -m http.server` over tmp_path on a free local port; its base URL."""
    for i in range(2):
        (tmp_path / f"s-{i}.tar").write_bytes(b"tar bytes")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_http_shards_must_answer(served):
    check_shard_urls(f"{served}/s-{{0..1}}.tar", "data.train")
    with pytest.raises(ValueError) as err:
        check_shard_urls(f"{served}/s-{{0..2}}.tar", "data.train")
    assert str(err.value) == f"data.train: 1 of 3 shards cannot be read: {served}/s-2.tar (HTTP 404)"


class _NoHeadHandler(http.server.SimpleHTTPRequestHandler):
    """Refuses HEAD (405) as some object stores do; records the Range of each GET."""

    ranges: list = []

    def do_HEAD(self):
        self.send_error(405)

    def do_GET(self):
        self.ranges.append(self.headers.get("Range"))
        super().do_GET()

    def log_message(self, *args):
        pass


def test_http_head_refused_falls_back_to_a_ranged_get(tmp_path):
    (tmp_path / "s-0.tar").write_bytes(b"tar bytes")
    handler = functools.partial(_NoHeadHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _NoHeadHandler.ranges = []
        check_shard_urls(f"{base}/s-0.tar", "data.val")
        assert _NoHeadHandler.ranges == ["bytes=0-0"]
        with pytest.raises(ValueError, match=rf"data.val: 1 of 1 shards.*{base}/s-1.tar \(HTTP 404\)"):
            check_shard_urls(f"{base}/s-1.tar", "data.val")
    finally:
        server.shutdown()
        server.server_close()


def test_missing_train_shard_is_reported_before_the_model_is_built(tmp_path, monkeypatch):
    import torch.distributed as dist

    import mmcontrast.train.loop as loop

    def no_model(*args, **kwargs):
        raise AssertionError("build_model was called before the inputs were checked")

    monkeypatch.setattr(loop, "build_model", no_model)
    # a world of one, as init_distributed would set up, but undone after the test
    env = dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "train-0.tar").write_bytes(b"x")
    run_dir = tmp_path / "run"
    cfg = load_config(
        None, [f"data.train={tmp_path}/train-{{0..1}}.tar", f"run.dir={run_dir}", "data.workers=0"]
    )
    try:
        with pytest.raises(ValueError, match=r"data.train: 1 of 2 shards.*train-1.tar \(no such file\)"):
            loop.train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not (run_dir / "config.yaml").exists()


# ---------------------------------------------------------------- training on them


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("style", ["img2dataset", "laion_audio"])
def test_training_reads_real_shard_layouts(style, img_shards, audio_shards, tmp_path, repo_root):
    run_dir = tmp_path / "run"
    audio = style == "laion_audio"
    config = {
        "run": {"dir": str(run_dir), "wandb": "disabled"},
        "data": {
            "train": audio_shards if audio else img_shards,
            "fields": AUDIO_FIELDS if audio else IMAGE_FIELDS,
            "batch_size": 6,
            "workers": 2,
            "shuffle_buffer": 8,
        },
        "model": {"clip": TINY_CLIP, "audio": {"backbone": "resnet10t", "n_mels": 32} if audio else None},
        "train": {"steps": 6, "warmup": 1, "log_every": 1, "checkpoint_every": 0, "progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "mmcontrast.cli", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=repo_root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [
        r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert json.loads((run_dir / "skipped.json").read_text())["counts"] == {}
