"""One shard -> its events: samples (dicts of raw bytes by extension) and skip records."""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator
from typing import NamedTuple

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

log = logging.getLogger("mmcontrast.data.pipeline")

# with_offsets: the byte range [OFFSET, END) of a sample's members in its tar
OFFSET, END = "__offset__", "__end__"


class Skip(NamedTuple):
    """A stream event for something that could not become a sample."""

    reason: str
    key: str


def tar_events(url: str, with_offsets: bool = False) -> Iterator[dict | Skip]:
    """Samples (dicts of raw bytes by extension) of one shard, plus skip records. with_offsets:
    each sample also holds the byte range of its members in the tar (OFFSET, END keys).

    Hand-rolled rather than webdataset's tar_file_expander + group_by_keys: on a truncated member
    those pass the incomplete sample on as if it were whole, and do not say which one it was; and
    a member repeated under the same key silently replaces the first (an image swapped under
    another caption). Here a key met twice in a shard, within one sample or after others, makes
    that sample a `duplicate_key` skip.
    """
    try:
        stream = gopen(url)
    except Exception as exc:
        log.warning("cannot open shard %s: %s", url, exc)
        yield Skip("bad_shard", url)
        return
    group: dict | None = None
    pending: str | None = None  # member whose header was read but not yet its data
    truncated = False
    seen: set[str] = set()  # sample keys of this shard so far
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*")
        except Exception as exc:
            log.warning("shard %s is not a readable tar: %s", url, exc)
            yield Skip("bad_shard", url)
            return
        try:
            for info in tf:
                pending = info.name
                key, ext = base_plus_ext(info.name)
                if not info.isreg() or key is None or os.path.basename(info.name).startswith("__"):
                    pending = None
                    continue
                data = tf.extractfile(info).read()
                pending = None
                tf.members = []  # stream mode would otherwise keep every header of the shard
                if group is not None and group["__key__"] != key:
                    yield checked(group)
                    group = None
                if group is None:
                    group = {"__key__": key, "__url__": url}
                    if with_offsets:
                        group[OFFSET] = info.offset
                    if key in seen:
                        group["__duplicate__"] = True
                    seen.add(key)
                if ext.lower() in group:
                    group["__duplicate__"] = True
                group[ext.lower()] = data
                if with_offsets:  # where the sample's members end, padded to the tar block
                    group[END] = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            # tarfile stops quietly when the stream ends inside a header; a real end reads a full
            # zero block at the current offset.
            pos = getattr(tf.fileobj, "pos", None)
            truncated = pos is not None and pos - tf.offset < tarfile.BLOCKSIZE
        except Exception as exc:
            log.warning("shard %s is truncated or corrupt: %s", url, exc)
            truncated = True
        if truncated:
            cut_key = base_plus_ext(pending)[0] if pending else None
            if group is not None and cut_key is not None and cut_key != group["__key__"]:
                yield checked(group)  # the cut member starts a new sample; the previous one is whole
                group = None
            known = cut_key or (group["__key__"] if group is not None else None)
            group = None
            yield Skip("truncated_tar", known or url)
        elif group is not None:
            yield checked(group)
    finally:
        try:
            stream.close()
        except Exception:  # a pipe closed early exits with SIGPIPE; its data is already judged
            pass


def checked(group: dict) -> dict | Skip:
    if group.pop("__duplicate__", False):
        log.warning("shard %s repeats sample key %r: skipping it", group["__url__"], group["__key__"])
        return Skip("duplicate_key", group["__key__"])
    return group
