"""WebDataset shards -> decoded, batched, resumable multimodal batches.

Entry point: `make_loader(urls, cfg, image_transform=..., tokenizer=..., train=...)` -> ShardLoader.

Iteration
    train=True:  `it = iter(loader); batch = next(it)` yields batches forever, moving to the next
                 epoch by itself (`loader.epoch`). Each `iter()` continues from the loader's
                 current position. In resampled mode an "epoch" is a round of
                 ceil(shards / (ranks * workers)) shard draws per worker, so that resuming never
                 replays more than one such round.
    train=False: each `iter()` is one fixed-order pass over the data (no shuffle, partial batches
                 kept); `loader.skipped` then holds that pass's counts.

Batch: {"image": (b,3,H,W) float (uint8 with a transform from data/image.py's split_device_normalize), "text": (b,L) long, "audio": (b,T) float,
        "present": {m: (b,) bool}, "__key__": [str], "__url__": [str], "meta": [dict | None],
        "skipped": {reason: n}, "skipped_keys": [str], "position": {...}}
with only the modalities of cfg.fields. Text comes from the first entry of data.fields.text that
holds a caption (`txt`, or a JSON key such as `json:caption`, see data/fields.py); a JSON list
holds several captions, of which training draws one per sample and epoch (seeded, so a resume
replays it) and evaluation takes the first. A sample lacking an image or audio field is kept
with present[m] False and zeros in its place; lacking text, or left with fewer than two
modalities, it is skipped. Corrupt samples are skipped, never raised. Skip reasons: bad_image,
too_large_image (the header claims more than data.max_image_pixels; nothing is decoded),
bad_audio (undecodable, or NaN/inf samples), duplicate_key (a key repeated in a shard),
bad_caption (not utf-8, bad JSON, a caption that is not a string or list of strings,
tokenizer failed), empty_caption, missing_caption, too_few_modalities, truncated_tar (the sample
a cut tar ended in; its key, else the shard URL), bad_shard (unopenable or not a tar; the URL).
`loader.skipped` / `loader.skipped_keys` total what the consumed batches (and each worker's
end-of-epoch marker, which carries skips after its last batch) reported.

Exact resume. The data of one epoch is split into `roles`, one per DataLoader worker (workers=0:
one role, in process). A role's stream is a pure function of (seed, epoch, rank, role): its shard
list (train: shuffled with (seed, epoch) before the rank/role split; resampled: drawn with
replacement by a seeded RNG), the weighted mix of "::" sources, and a seeded shuffle buffer over the
*undecoded* samples. Decoding happens after the shuffle, and a role counts the events it has taken
from that stream (samples, including skipped ones, plus tar-level skip records). Every batch
reports (epoch, role, offset); each role ends its epoch with a marker item, so the loader knows
which roles are done. DataLoader(batch_size=None) hands out items round robin over live workers in
worker order, so the output order is fixed. `state_dict()` records offsets, done roles and the role
due next; a loader built with `position=` replays each role's stream up to its offset *without
decoding*, and worker w plays role (w + next_role) % roles, so the round robin continues exactly
where the interrupted run stopped. With a shard index (data/shard_index.py) the replay reads no
shard it passes over: indexed shards enter the stream as byte ranges, and only the samples still
in the shuffle buffer at the resume point are read, by seeking. Random audio crops are seeded per (seed, epoch, rank, role,
event index), so they replay too.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from mmcontrast.config import MODALITIES, DataConfig
from mmcontrast.data import negatives as neg
from mmcontrast.data.audio import decode_audio
from mmcontrast.data.fields import captions_from_sample, check_field_specs, parse_field_spec
from mmcontrast.data.image import ImageDecodeError, ImageTooLargeError, decode_image
from mmcontrast.data.shard_index import Ref, RefReader, indexed_events, read_entry
from mmcontrast.data.tar_events import Skip

log = logging.getLogger(__name__)

POSITION_VERSION = 1


# ---------------------------------------------------------------- urls


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _local_path(url: str) -> str:
    return url[5:] if url.startswith("file:") else url


def _expand_spec(spec: str) -> list[str]:
    """One source's shard URLs: brace-expanded, and local globs matched on disk."""
    shards: list[str] = []
    for url in expand_urls(spec):
        path = _local_path(url)
        if _is_local(url) and glob.has_magic(path):
            shards.extend(sorted(glob.glob(path)))
        else:
            shards.append(url)
    return shards


def expand_sources(urls: str) -> list[list[str]]:
    """Split "::"-joined sources and brace/glob-expand each; check local shards exist."""
    if not urls or not urls.strip():
        raise ValueError("no shard URLs given (data.train / data.val is empty)")
    sources = []
    for spec in urls.split("::"):
        spec = spec.strip()
        shards = _expand_spec(spec)
        if not shards:
            raise ValueError(f"no shards match {spec!r}")
        missing = [u for u in shards if _is_local(u) and not os.path.exists(_local_path(u))]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ValueError(
                f"{len(missing)} of the {len(shards)} shards of {spec!r} do not exist: {missing[:3]}{more}"
            )
        sources.append(shards)
    return sources


def check_shard_urls(urls: str, key: str) -> None:
    """Check that every shard of `urls` can be opened; a ValueError names `key` and the failures.

    Local shards must be readable regular files; http(s) URLs must answer a HEAD request (a
    1-byte ranged GET where HEAD is refused) and need curl, which webdataset reads them with;
    `pipe:` commands need their program on PATH. Other schemes are left to the reader.
    """
    if not urls or not urls.strip():
        raise ValueError(f"{key} is empty: give it brace-expanded shard URLs")
    shards: list[str] = []
    for spec in urls.split("::"):
        found = _expand_spec(spec.strip())
        if not found:
            raise ValueError(f"{key}: no shards match {spec.strip()!r}")
        shards.extend(found)
    shards = list(dict.fromkeys(shards))
    with ThreadPoolExecutor(max_workers=16) as pool:  # remote checks mostly wait on the network
        problems = list(pool.map(_shard_problem, shards))
    failed = [f"{url} ({problem})" for url, problem in zip(shards, problems, strict=True) if problem]
    if failed:
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise ValueError(
            f"{key}: {len(failed)} of {len(shards)} shards cannot be read: {'; '.join(failed[:3])}{more}"
        )


def check_shard_urls_on_each_node(urls: str, key: str) -> None:
    """check_shard_urls once per node, not once per rank (64 ranks would stat or HEAD every shard
    64 times): the node's local rank 0 checks, since a node that cannot see a shard must fail
    there, and every rank learns every node's outcome, so all raise the same ValueError rather
    than some waiting for the others in a collective. Collective."""
    import torch.distributed as dist

    problem = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            check_shard_urls(urls, key)
        except ValueError as exc:
            problem = f"{exc} (seen on {socket.gethostname()})"
    if not (dist.is_available() and dist.is_initialized()):
        problems = [problem]
    else:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise ValueError(found[0])


def _shard_problem(url: str) -> str | None:
    """Why one shard cannot be opened, or None when it looks fine."""
    if url.startswith("pipe:"):
        return _pipe_problem(url[5:])
    if _is_local(url):
        return _local_problem(_local_path(url))
    if url.split("://", 1)[0].lower() in ("http", "https"):
        return _http_problem(url)
    return None


def _local_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def _pipe_problem(command: str) -> str | None:
    try:
        words = [w for w in shlex.split(command) if not _ENV_ASSIGNMENT.fullmatch(w)]
    except ValueError as exc:
        return f"cannot parse the pipe: command: {exc}"
    if not words:
        return "empty pipe: command"
    if shutil.which(words[0]) is None:
        return f"program {words[0]!r} is not on PATH"
    return None


def _http_problem(url: str) -> str | None:
    if shutil.which("curl") is None:
        return "curl, which webdataset reads http shards with, is not on PATH"
    try:
        status = _http_status(url, "HEAD")
        if status == 405:  # some servers refuse HEAD; one byte of the body says as much
            status = _http_status(url, "GET", {"Range": "bytes=0-0"})
    except (OSError, HTTPException) as exc:
        return f"no answer: {getattr(exc, 'reason', exc)}"
    return f"HTTP {status}" if status >= 400 else None


def _http_status(url: str, method: str, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ---------------------------------------------------------------- raw stream


def _source_events(shards: list[str], index_dir: str | None = None) -> Iterator[dict | Skip | Ref]:
    """The events of consecutive shards. A shard with a valid index entry gives references
    (read only when they are used: a resume fast-forwards over them without reading); the
    others are read, and their entries written once read to the end."""
    for url in shards:
        known = read_entry(index_dir, url)
        yield from known if known is not None else indexed_events(url, index_dir)


def _mix(
    streams: list[Iterator], weights: list[float], rng: random.Random, stop_at_first: bool
) -> Iterator[dict | Skip]:
    """Draw each next event from a source chosen with probability ~ weight."""
    active = list(range(len(streams)))
    try:
        while active:
            (s,) = rng.choices(active, weights=[weights[i] for i in active])
            ev = next(streams[s], None)
            if ev is None:
                if stop_at_first:  # resampled: keep the mix ratio; the next round starts afresh
                    return
                active.remove(s)
                continue
            yield ev
    finally:
        for st in streams:
            st.close()


def _shuffle(events: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded shuffle buffer; skip records pass straight through (they carry no data)."""
    buf: list = []
    for ev in events:
        if isinstance(ev, Skip):
            yield ev
        elif len(buf) < size:
            buf.append(ev)
        else:
            i = rng.randrange(size)
            yield buf[i]
            buf[i] = ev
    rng.shuffle(buf)
    yield from buf


def _rng(*parts: Any) -> random.Random:
    # str seeds go through sha512: the same in every process, unlike hash().
    return random.Random("/".join(map(str, parts)))


def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------- worker side


class StreamId(NamedTuple):
    """One role's stream of an epoch, named by the layout that defined it."""

    epoch: int
    rank: int
    world_size: int
    roles: int
    role: int


class _RoleStream(IterableDataset):
    """What each DataLoader worker runs: one role's events -> decoded batches + end marker."""

    def __init__(
        self,
        sources: list[list[str]],
        weights: list[float],
        cfg: DataConfig,
        image_transform: Callable | None,
        tokenizer: Callable | None,
        train: bool,
        resampled: bool,
        seed: int,
        rank: int,
        world_size: int,
        roles: int,
        batch_size: int,
        index_dir: str | None = None,
    ):
        super().__init__()
        self.index_dir = index_dir
        self.sources, self.weights = sources, weights
        self.modalities = [m for m in MODALITIES if m in cfg.fields]
        self.fields = {m: parse_field_spec(cfg.fields[m]) for m in self.modalities}
        self.max_image_pixels = cfg.max_image_pixels
        self.sample_rate = cfg.audio_sample_rate
        self.num_samples = round(cfg.audio_seconds * cfg.audio_sample_rate)
        self.shuffle_buffer = cfg.shuffle_buffer if train else 0
        self.image_transform, self.tokenizer = image_transform, tokenizer
        self.train, self.resampled = train, resampled
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.roles, self.batch_size = roles, batch_size
        self.negatives = cfg.negatives if "text" in self.modalities else ""
        self.negatives_per_sample = cfg.negatives_per_sample
        # set per epoch by ShardLoader before workers start
        self.epoch, self.rotation = 0, 0
        self.offsets, self.done = [0] * roles, [False] * roles
        self.carry: list | None = None  # per role, after an elastic resume: see ShardLoader.continue_layout
        self._image_like: torch.Tensor | None = None  # shape and dtype of a missing image's zeros

    # -- which shards a role reads

    def native(self, role: int) -> StreamId:
        return StreamId(self.epoch, self.rank, self.world_size, self.roles, role)

    def role_shards(self, source: int, sid: StreamId) -> list[str]:
        urls = self.sources[source]
        if self.resampled:
            rng = _rng(self.seed, sid.epoch, sid.rank, sid.role, "resample", source)
            k = max(1, math.ceil(len(urls) / (sid.world_size * sid.roles)))
            return [rng.choice(urls) for _ in range(k)]
        urls = list(urls)
        if self.train:  # same permutation on every rank, so the rank split stays disjoint
            _rng(self.seed, sid.epoch, "shards", source).shuffle(urls)
        return urls[sid.rank :: sid.world_size][sid.role :: sid.roles]

    def events(self, sid: StreamId) -> Iterator[dict | Skip | Ref]:
        """The stream `sid` names: a pure function of (seed, sid), whatever the layout reading it."""
        shards = [self.role_shards(s, sid) for s in range(len(self.sources))]
        streams = [_source_events(urls, self.index_dir) for urls in shards]
        if len(streams) == 1:
            ev = streams[0]
        else:
            mix_rng = _rng(self.seed, sid.epoch, sid.rank, sid.role, "mix")
            ev = _mix(streams, self.weights, mix_rng, stop_at_first=self.resampled)
        if self.shuffle_buffer > 1:
            ev = _shuffle(ev, self.shuffle_buffer, _rng(self.seed, sid.epoch, sid.rank, sid.role, "shuffle"))
        return ev

    def flow(self, role: int) -> Iterator[dict | Skip | Ref]:
        """What role `role` plays this epoch: its own stream, or (the epoch an elastic resume
        began) its share of the streams another layout left unfinished."""
        if self.carry is None:
            return self.events(self.native(role))
        return itertools.chain.from_iterable(
            itertools.islice(self.events(StreamId(*sid)), offset + phase, None, stride)
            for sid, offset, stride, phase in self.carry[role]
        )

    # -- decoding

    def _field(self, raw: dict, modality: str) -> str | None:
        return next((ref.ext for ref in self.fields[modality] if ref.ext in raw), None)

    def _captions(self, raw: dict) -> tuple[list[str] | None, str | None]:
        """(captions or None when the sample has none, skip reason for unusable ones)."""
        try:
            captions = captions_from_sample(raw, self.fields["text"])
        except ValueError:
            return None, "bad_caption"
        return captions, "empty_caption" if captions == [] else None

    def _pick_caption(self, captions: list[str], role: int, index: int) -> str:
        if not self.train or len(captions) == 1:
            return captions[0]
        # one caption per sample and epoch, drawn again identically on resume
        rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, role, index, "caption"))
        return rng.choice(captions)

    def decode(self, raw: dict, role: int, index: int) -> tuple[dict | None, str | None]:
        """(sample, None) or (None, skip reason)."""
        fields = {m: self._field(raw, m) for m in self.modalities if m != "text"}
        has_text = "text" in self.modalities
        captions, problem = self._captions(raw) if has_text else (None, None)
        if has_text and captions is None and problem is None:
            return None, "missing_caption"
        if has_text + sum(f is not None for f in fields.values()) < 2:
            return None, "too_few_modalities"
        out: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw.get("__url__", "")}
        if has_text:
            if problem:
                return None, problem
            caption = self._pick_caption(captions, role, index)
            try:
                out["text"] = self.tokenizer([caption])[0]
            except Exception:
                return None, "bad_caption"
        if fields.get("image"):
            try:
                image = decode_image(raw[fields["image"]], self.max_image_pixels)
            except ImageTooLargeError:
                return None, "too_large_image"
            except ImageDecodeError:
                return None, "bad_image"
            try:
                out["image"] = self._transform_image(image, role, index)
            except Exception:
                return None, "bad_image"
            if self._image_like is None:
                self._image_like = torch.zeros_like(out["image"])
        if fields.get("audio"):
            gen = None
            if self.train:
                gen = torch.Generator().manual_seed(_seed_int(self.seed, self.epoch, self.rank, role, index))
            try:
                out["audio"] = decode_audio(
                    raw[fields["audio"]], self.sample_rate, self.num_samples, generator=gen
                )
            except Exception:
                return None, "bad_audio"
        meta = None
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError:
                meta = None  # metadata is optional; a bad one does not cost the sample
        out["meta"] = meta
        if self.negatives and "text" in out:
            out["text_negatives"], out["text_negatives_valid"], problem = self._negatives(
                raw, caption, meta, role, index
            )
            if problem:
                out["negatives_skip"] = problem
        return out, None

    def _negatives(self, raw: dict, caption: str, meta, role: int, index: int):
        """(k, L) tokens, (k,) valid mask and a skip reason (or None) for a sample's negatives.

        All three sources give a list of strings, then the same selection and tokenization.
        A negatives problem is counted ("negatives/<reason>") and costs only the negatives.
        """
        texts, problem = [], None
        if self.negatives == "shard":
            if "neg.json" not in raw:
                problem = "missing_neg_json"
            else:
                try:
                    texts = json.loads(raw["neg.json"])
                    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                        raise ValueError("neg.json must hold a list of strings")
                except (ValueError, UnicodeDecodeError):
                    texts, problem = [], "bad_neg_json"
        elif self.negatives == "demo":
            if isinstance(meta, dict) and "caption_template" in meta and "objects" in meta:
                texts = list(neg.demo_negatives(meta, neg.sample_rng(raw["__key__"])).values())
            else:
                problem = "no_demo_metadata"
        else:
            texts = list(neg.rule_negatives(caption, neg.sample_rng(raw["__key__"])).values())
        texts = [t.strip() for t in texts if t.strip() and t.strip() != caption]
        if self.train:  # a different choice of k each epoch, replayed exactly on resume
            random.Random(_seed_int(self.seed, self.epoch, self.rank, role, index, "negatives")).shuffle(
                texts
            )
        texts = texts[: self.negatives_per_sample]
        k = self.negatives_per_sample
        tokens = self.tokenizer(texts + [""] * (k - len(texts)))
        valid = torch.tensor([i < len(texts) for i in range(k)], dtype=torch.bool)
        return tokens, valid, problem

    def _transform_image(self, image: Image.Image, role: int, index: int) -> torch.Tensor:
        if not self.train:
            return self.image_transform(image)
        # Augmentations draw from torch's global CPU generator: seed it per sample (and restore it
        # after) so a resumed run replays the same crops whatever the worker's RNG history. Only the
        # CPU generator: torch.manual_seed also queues a CUDA seed with a captured stack trace,
        # which cost a fifth of the pipeline's time per sample.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(_seed_int(self.seed, self.epoch, self.rank, role, index, "image"))
        try:
            return self.image_transform(image)
        finally:
            generator.set_state(state)

    def _zeros(self, modality: str) -> torch.Tensor:
        if modality == "audio":
            return torch.zeros(self.num_samples)
        if modality == "image":
            if self._image_like is None:  # no image decoded yet in this worker: ask the transform
                self._image_like = self.image_transform(Image.new("RGB", (224, 224)))
            return torch.zeros_like(self._image_like)
        return torch.zeros_like(self.tokenizer([""])[0])

    def collate(self, samples: list[dict]) -> dict:
        batch: dict[str, Any] = {"present": {}}
        for m in self.modalities:
            present = [m in s for s in samples]
            ref = next((s[m] for s in samples if m in s), None)
            zeros = torch.zeros_like(ref) if ref is not None else self._zeros(m)
            batch[m] = torch.stack([s.get(m, zeros) for s in samples])
            batch["present"][m] = torch.tensor(present, dtype=torch.bool)
        if self.negatives:
            k = self.negatives_per_sample
            empty = self.tokenizer([""] * k)
            batch["text_negatives"] = torch.stack([s.get("text_negatives", empty) for s in samples])
            batch["present"]["text_negatives"] = torch.stack(
                [s.get("text_negatives_valid", torch.zeros(k, dtype=torch.bool)) for s in samples]
            )
        batch["__key__"] = [s["__key__"] for s in samples]
        batch["__url__"] = [s["__url__"] for s in samples]
        batch["meta"] = [s["meta"] for s in samples]
        return batch

    # -- the role's loop

    def role_items(self, role: int, start: int) -> Iterator[dict]:
        samples: list[dict] = []
        skipped: dict[str, int] = {}
        skipped_keys: list[str] = []

        def emit(item: dict, offset: int) -> dict:
            nonlocal skipped, skipped_keys
            item["skipped"], item["skipped_keys"] = skipped, skipped_keys
            item["position"] = {"epoch": self.epoch, "rank": self.rank, "role": role, "offset": offset}
            skipped, skipped_keys = {}, []
            return item

        count = 0
        reader = RefReader()
        for index, ev in enumerate(self.flow(role)):
            count = index + 1
            if index < start:  # replay to the resume point without decoding (or reading, if indexed)
                continue
            if isinstance(ev, Ref):
                ev = reader.load(ev)
            if isinstance(ev, Skip):
                sample, reason, key = None, ev.reason, ev.key
            else:
                sample, reason = self.decode(ev, role, index)
                key = ev["__key__"]
            if sample is None:
                skipped[reason] = skipped.get(reason, 0) + 1
                skipped_keys.append(key)
                continue
            if "negatives_skip" in sample:  # the sample stays; only its negatives are lost
                reason = f"negatives/{sample.pop('negatives_skip')}"
                skipped[reason] = skipped.get(reason, 0) + 1
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield emit(self.collate(samples), count)
                samples = []
        reader.close()
        count = max(count, start)
        if samples and not self.train:  # training drops the partial batch, evaluation keeps it
            yield emit(self.collate(samples), count)
        yield emit({"__end__": True}, count)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.rotation) % self.roles
        if self.done[role]:
            return
        yield from self.role_items(role, self.offsets[role])


def workers_ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C, SIGTERM and SIGUSR1 to the trainer.

    A signal sent to the whole process group (Ctrl-C, `kill -TERM -PGID`, many schedulers) also
    reaches the workers, and torch's worker handler dies on it, which would kill the run before
    it can checkpoint. The main process stops after its step and shuts the workers down itself.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing terminates daemonic children with SIGTERM and then joins
    them. Workers ignore SIGTERM (above), so one left running by an error (torch skips its own
    worker shutdown once the interpreter is exiting) would hold the exit forever, and with it a
    rank whose peer died. Registered after multiprocessing's handler, so it runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_at_exit)


def _identity(x: Any) -> Any:
    return x


# ---------------------------------------------------------------- main-process side


class ShardLoader:
    """Iterable of batches with skip totals and an exact, checkpointable position.

    Attributes: `epoch` (current epoch), `skipped` ({reason: count}) and `skipped_keys` (keys, or
    shard URLs where no key is known) over the batches handed out, `roles` (worker streams).
    `write_skipped_keys_to(path)` appends the keys to a file as they come instead (a long run's
    list would only grow; the file also outlives a resume).
    Methods: `state_dict()` / `load_state_dict(d)`; `make_loader(..., position=d)` does the latter.
    """

    def __init__(self, stream: _RoleStream, workers: int, position: dict | None = None):
        self.stream = stream
        self.workers = workers
        self.roles = stream.roles
        self.train = stream.train
        self.skipped: dict[str, int] = {}
        self.skipped_keys: list[str] = []
        self._keys_file: Path | None = None
        self._warned: set[str] = set()
        self._new_epoch(0)
        if position is not None:
            self.load_state_dict(position)

    def write_skipped_keys_to(self, path) -> None:
        self._keys_file = Path(path)
        self._keys_file.parent.mkdir(parents=True, exist_ok=True)

    def _keep_skipped_keys(self, keys: list[str]) -> None:
        if self._keys_file is None:
            self.skipped_keys.extend(keys)
            return
        with open(self._keys_file, "a") as f:
            f.write("".join(f"{k}\n" for k in keys))

    def _new_epoch(self, epoch: int, carry: list | None = None) -> None:
        self.epoch = epoch
        self._carry = carry
        self._offsets = [0] * self.roles
        self._done = [False] * self.roles
        self._last_role = -1
        self._batches = 0

    def _next_role(self) -> int:
        for k in range(1, self.roles + 1):
            r = (self._last_role + k) % self.roles
            if not self._done[r]:
                return r
        return 0

    # -- position

    def _identity_fields(self) -> dict:
        s = self.stream
        return {
            "roles": self.roles,
            "rank": s.rank,
            "world_size": s.world_size,
            "seed": s.seed,
            "resampled": s.resampled,
        }

    def _fingerprint(self) -> str:
        s = self.stream
        fields = {m: [str(ref) for ref in refs] for m, refs in s.fields.items()}
        what = [s.sources, s.weights, fields, s.shuffle_buffer, s.batch_size, s.num_samples]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """Position after the last batch handed out (plain JSON-able data)."""
        return {
            "version": POSITION_VERSION,
            **self._identity_fields(),
            "fingerprint": self._fingerprint(),
            "epoch": self.epoch,
            "batches": self._batches,
            "offsets": list(self._offsets),
            "done": list(self._done),
            "next_role": self._next_role(),
            "skipped": dict(self.skipped),
            "carry": self._carry,
        }

    def load_state_dict(self, position: dict) -> None:
        if not self.train:
            raise ValueError("a data position can only be restored into a train loader (train=True)")
        if position.get("version") != POSITION_VERSION:
            raise ValueError(
                f"data position version {position.get('version')!r}; this code reads {POSITION_VERSION}"
            )
        for k, v in self._identity_fields().items():
            if position.get(k) != v:
                hint = " (data.workers must match the run being resumed)" if k == "roles" else ""
                raise ValueError(
                    f"cannot resume data position: it was saved with {k}={position.get(k)!r}, now {v!r}{hint}"
                )
        if position.get("fingerprint") != self._fingerprint():
            log.warning(
                "resuming data position with other shards, weights, fields, batch size or shuffle "
                "buffer than it was saved with: the order continues, but not exactly"
            )
        self._new_epoch(int(position["epoch"]), position.get("carry"))
        self._offsets = [int(x) for x in position["offsets"]]
        self._done = [bool(x) for x in position["done"]]
        self._last_role = (int(position["next_role"]) - 1) % self.roles
        self._batches = int(position["batches"])
        self.skipped = {str(k): int(v) for k, v in position.get("skipped", {}).items()}

    def continue_layout(self, positions: list[dict]) -> None:
        """Continue an epoch that another layout (number of ranks or workers) began: `positions`
        are the state_dict() of each of its ranks. Every sample that layout had not consumed is
        read once, split over this layout's ranks and workers: a role takes whole unfinished
        streams when there are as many as roles, else every n-th event of a stream it shares
        with n - 1 others. The order differs from an uninterrupted run; the next epoch is this
        layout's own. Collective in effect: every rank must be given the same positions.
        """
        if not self.train:
            raise ValueError("a data position can only be restored into a train loader (train=True)")
        mine = self._identity_fields()
        for position in positions:
            if position.get("version") != POSITION_VERSION:
                raise ValueError(
                    f"data position version {position.get('version')!r}; this code reads {POSITION_VERSION}"
                )
            for key in ("seed", "resampled"):
                if position.get(key) != mine[key]:
                    raise ValueError(
                        f"cannot continue the data order: it was saved with {key}={position.get(key)!r}, now {mine[key]!r}"
                    )
            if position.get("carry") is not None:
                raise ValueError(
                    f"the checkpoint was written while epoch {position['epoch']} was itself continuing another "
                    "layout's data; resume it with the number of ranks and workers that wrote it until that epoch ends"
                )
        epochs = {int(p["epoch"]) for p in positions}
        if len(epochs) != 1:
            raise ValueError(
                f"the checkpoint's ranks were in different epochs ({sorted(epochs)}); resume it with the number "
                "of ranks and workers that wrote it"
            )
        if any(p.get("fingerprint") != self._fingerprint() for p in positions):
            log.warning(
                "continuing a data order saved with other shards, weights, fields, batch size or shuffle buffer"
            )
        (epoch,) = epochs
        unfinished = [
            ([epoch, p["rank"], p["world_size"], p["roles"], role], int(p["offsets"][role]))
            for p in sorted(positions, key=lambda p: p["rank"])
            for role in range(p["roles"])
            if not p["done"][role]
        ]
        slots = self.stream.world_size * self.roles  # this layout's roles, over every rank
        carry = []
        for role in range(self.roles):
            g = self.stream.rank * self.roles + role
            if len(unfinished) >= slots:
                carry.append(
                    [[sid, offset, 1, 0] for i, (sid, offset) in enumerate(unfinished) if i % slots == g]
                )
            elif unfinished:
                sharing = [h for h in range(slots) if h % len(unfinished) == g % len(unfinished)]
                sid, offset = unfinished[g % len(unfinished)]
                carry.append([[sid, offset, len(sharing), sharing.index(g)]])
        if unfinished:
            self._new_epoch(epoch, carry)
        else:
            self._new_epoch(epoch + 1)
        self.skipped = {}
        for p in positions:  # each old rank's totals go to one new rank, so sums over ranks hold
            if p["rank"] % self.stream.world_size == self.stream.rank:
                for reason, n in p.get("skipped", {}).items():
                    self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    # -- iteration

    def _items(self) -> Iterator[dict]:
        s = self.stream
        s.epoch, s.rotation = self.epoch, self._next_role()
        s.offsets, s.done, s.carry = list(self._offsets), list(self._done), self._carry
        if self.workers == 0:
            return iter(s)
        loader = DataLoader(
            s,
            worker_init_fn=workers_ignore_stop_signals,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=torch.cuda.is_available(),  # for the trainer's non-blocking copies
            # own generator: creating the loader must not draw from the trainer's global RNG
            generator=torch.Generator().manual_seed(s.seed),
        )
        return iter(loader)

    def _run_epoch(self) -> Iterator[dict]:
        for item in self._items():
            pos = item["position"]
            role = pos["role"]
            self._offsets[role] = pos["offset"]
            self._last_role = role
            for reason, n in item["skipped"].items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
                if reason not in self._warned:
                    self._warned.add(reason)
                    log.warning(
                        "skipping samples (%s), e.g. %s; totals in loader.skipped",
                        reason,
                        item["skipped_keys"][:3],
                    )
            if item["skipped_keys"]:
                self._keep_skipped_keys(item["skipped_keys"])
            if item.get("__end__"):
                self._done[role] = True
                continue
            self._batches += 1
            yield item

    def __iter__(self) -> Iterator[dict]:
        if not self.train:
            self._new_epoch(0)
            self.skipped, self.skipped_keys = {}, []
            yield from self._run_epoch()
            return
        while True:
            fresh = not any(self._offsets) and not any(self._done) and self._carry is None
            n = 0
            for batch in self._run_epoch():
                n += 1
                yield batch
            if fresh and n == 0:
                raise RuntimeError(
                    f"epoch {self.epoch} produced no batch: every worker had fewer than batch_size="
                    f"{self.stream.batch_size} good samples (skipped so far: {self.skipped}); lower "
                    "data.batch_size or data.workers, or check the shards"
                )
            self._new_epoch(self.epoch + 1)


def make_loader(
    urls: str,
    cfg: DataConfig,
    *,
    image_transform: Callable | None,
    tokenizer: Callable | None,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    weights: list[float] | None = None,
    position: dict | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    index_dir: str | None = None,
) -> ShardLoader:
    """Build the loader for one rank. See the module docstring for iteration and resume.

    urls: brace-expanded shard URLs (local paths, globs, `pipe:` commands, http...), several
    sources joined with "::" and mixed by `weights` (default cfg.train_weights for train, else
    equal). Eval loaders never resample and cap their workers at this rank's shard count.
    index_dir (train loaders): the shard index (data/shard_index.py) read for a fast resume and
    filled as shards are read.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    check_field_specs(cfg.fields)
    modalities = [m for m in MODALITIES if m in cfg.fields]
    if "image" in modalities and image_transform is None:
        raise ValueError("data.fields has image but no image_transform was given")
    if "text" in modalities and tokenizer is None:
        raise ValueError("data.fields has text but no tokenizer was given")
    sources = expand_sources(urls)
    if weights is None:
        weights = list(cfg.train_weights) if train and cfg.train_weights else [1.0] * len(sources)
    if len(weights) != len(sources) or any(w <= 0 for w in weights):
        raise ValueError(
            f"need {len(sources)} positive weights, one per '::'-separated source, got {weights}"
        )
    batch_size = cfg.batch_size if batch_size is None else batch_size
    workers = cfg.workers if workers is None else workers
    if batch_size < 1 or workers < 0:
        raise ValueError(f"need batch_size >= 1 and workers >= 0, got {batch_size} and {workers}")
    resampled = cfg.resampled and train
    if not resampled:
        for spec, shards in zip(urls.split("::"), sources, strict=True):
            n = len(shards[rank::world_size])
            need = max(1, workers)
            if n >= need:
                continue
            if not train and n > 0:
                workers = min(workers, n)  # evaluation: fewer workers, same data
                continue
            raise ValueError(
                f"{spec.strip()!r} has {len(shards)} shards; split over {world_size} rank(s) this rank gets "
                f"{n}, fewer than its {need} data worker(s), and every worker needs at least one shard. "
                "Lower data.workers, write more (smaller) shards, or set data.resampled=true."
            )
    stream = _RoleStream(
        sources,
        [float(w) for w in weights],
        cfg,
        image_transform,
        tokenizer,
        train=train,
        resampled=resampled,
        seed=seed,
        rank=rank,
        world_size=world_size,
        roles=max(1, workers),
        batch_size=batch_size,
        index_dir=index_dir if train else None,
    )
    if position is not None and not train:
        raise ValueError("position= is for train loaders; eval loaders always make one full pass")
    return ShardLoader(stream, workers, position)
