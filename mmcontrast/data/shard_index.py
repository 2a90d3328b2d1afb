"""Where each sample of a shard lies, so that a resumed loader fast-forwards over the shards it
already consumed without reading them (bounded resume; open_clip's sizes.json holds counts only).

One entry per shard, `<index dir>/<sha256(url)[:20]>.json`:
    {"url", "size", "mtime_ns", "events": [[key, offset, end] | ["!", reason, key], ...]}
listing exactly the events `tar_events(url)` yields: a sample with the byte range of its members,
or a skip record. Only local shards are indexed; size and mtime must still match, else the entry
is ignored. Entries are written by `mmcontrast data index URLS --out DIR` and by training loaders
as each worker finishes reading a shard, so a run's consumed shards are indexed by the time it
needs them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from webdataset.tariterators import base_plus_ext

from mmcontrast.data.tar_events import END, OFFSET, Skip, tar_events

log = logging.getLogger("mmcontrast.data.pipeline")


class Ref(NamedTuple):
    """A sample known by its place in a shard; `RefReader.load` reads it."""

    url: str
    key: str
    offset: int
    end: int


def local_path(url: str) -> str | None:
    if url.startswith("pipe:") or "://" in url:
        return None
    return url[5:] if url.startswith("file:") else url


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def entry_path(index_dir: str | Path, url: str) -> Path:
    return Path(index_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:20]}.json"


def _entry(url: str, stat: tuple[int, int], events: list) -> dict:
    return {"url": url, "size": stat[0], "mtime_ns": stat[1], "events": events}


def _write(index_dir: str | Path, entry: dict) -> None:
    path = entry_path(index_dir, entry["url"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers of several ranks may race
    tmp.write_text(json.dumps(entry, separators=(",", ":")))
    os.replace(tmp, path)


def _as_record(event) -> list:
    if isinstance(event, Skip):
        return ["!", event.reason, event.key]
    return [event["__key__"], event[OFFSET], event[END]]


def read_entry(index_dir: str | Path | None, url: str) -> list[Ref | Skip] | None:
    """The shard's events from its index entry, or None (no index, not local, absent, stale)."""
    path = local_path(url)
    if not index_dir or path is None:
        return None
    try:
        entry = json.loads(entry_path(index_dir, url).read_text())
    except (OSError, ValueError):
        return None
    if entry.get("url") != url or [entry.get("size"), entry.get("mtime_ns")] != list(_stat(path) or ()):
        return None
    return [Skip(e[1], e[2]) if e[0] == "!" else Ref(url, e[0], e[1], e[2]) for e in entry["events"]]


def indexed_events(url: str, index_dir: str | Path | None) -> Iterator[dict | Skip]:
    """tar_events(url), writing the shard's index entry once it has been read to its end."""
    path = local_path(url)
    stat = _stat(path) if index_dir and path is not None else None
    if stat is None:
        yield from tar_events(url)
        return
    records = []
    for event in tar_events(url, with_offsets=True):
        records.append(_as_record(event))
        if not isinstance(event, Skip):
            event.pop(OFFSET)
            event.pop(END)
        yield event
    if _stat(path) == stat:  # the file did not change while it was read
        try:
            _write(index_dir, _entry(url, stat, records))
        except OSError as exc:  # an index is an optimisation: never fail training for it
            log.warning("cannot write the shard index entry of %s: %s", url, exc)


def index_shards(urls: list[str], index_dir: str | Path) -> dict:
    """Write the entry of every local shard in `urls`; {"indexed", "samples", "skipped"}."""
    report = {"indexed": 0, "samples": 0, "skipped": 0, "not_local": 0}
    for url in urls:
        path = local_path(url)
        stat = _stat(path) if path is not None else None
        if stat is None:
            report["not_local"] += 1
            continue
        records = [_as_record(e) for e in tar_events(url, with_offsets=True)]
        _write(index_dir, _entry(url, stat, records))
        report["indexed"] += 1
        report["samples"] += sum(r[0] != "!" for r in records)
        report["skipped"] += sum(r[0] == "!" for r in records)
    return report


class RefReader:
    """Reads indexed samples by their byte range, keeping the last shard open (consecutive
    samples of a shard cost one seek each)."""

    def __init__(self):
        self._url: str | None = None
        self._file = None

    def load(self, ref: Ref) -> dict:
        if ref.url != self._url:
            self.close()
            self._file, self._url = open(local_path(ref.url), "rb"), ref.url  # noqa: SIM115
        self._file.seek(ref.offset)
        data = self._file.read(ref.end - ref.offset)
        sample = {"__key__": ref.key, "__url__": ref.url}
        padded = io.BytesIO(data + b"\0" * (2 * tarfile.BLOCKSIZE))  # the end-of-archive blocks
        with tarfile.open(fileobj=padded, mode="r|") as tf:
            for info in tf:
                key, ext = base_plus_ext(info.name)
                if info.isreg() and key is not None and not os.path.basename(info.name).startswith("__"):
                    sample[ext.lower()] = tf.extractfile(info).read()
        return sample

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._url = None, None
