"""Which shard fields feed a modality: `data.fields` specs and captions read from them.

A spec is `;`-separated entries tried in order; each is a sample extension (`txt`, `jpg`) or, for
text, `ext:key`: a key of a JSON field (`json:caption`), as img2dataset and LAION-audio shards
keep their captions. The JSON value may be a string or a list of strings (several captions).

Light on purpose (no torch, no PIL): config validation imports it.
"""

from __future__ import annotations

import json
from typing import NamedTuple


class FieldRef(NamedTuple):
    """One entry of a field spec: a sample extension and, for JSON fields, the key to read."""

    ext: str
    key: str | None

    def __str__(self) -> str:
        return self.ext if self.key is None else f"{self.ext}:{self.key}"


def parse_field_spec(spec: str) -> list[FieldRef]:
    """`"txt;json:caption"` -> [FieldRef("txt", None), FieldRef("json", "caption")].

    Extensions are lower-cased (the shard reader lower-cases them too); keys stay as written.
    """
    refs = []
    for entry in spec.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ext, sep, key = entry.partition(":")
        ext, key = ext.strip().lower(), key.strip()
        if not ext or (sep and not key):
            raise ValueError(f"field entry {entry!r} is not an extension or ext:key (e.g. json:caption)")
        refs.append(FieldRef(ext, key if sep else None))
    return refs


def check_field_specs(fields: dict[str, str]) -> None:
    """Refuse specs the pipeline cannot read, naming the `data.fields.<modality>` key."""
    for modality, spec in fields.items():
        name = f"data.fields.{modality}"
        try:
            refs = parse_field_spec(spec)
        except ValueError as exc:
            raise ValueError(f"{name}: bad value {spec!r}: {exc}") from None
        if not refs:
            raise ValueError(f"{name}: bad value {spec!r}; allowed: ';'-separated field names")
        for ref in refs:
            if ref.key is not None and modality != "text":
                raise ValueError(
                    f"{name}: bad value {spec!r}; ext:key entries ({ref}) are for text only: "
                    f"{modality} is read whole from a field"
                )
            is_json = ref.ext == "json" or ref.ext.endswith(".json")
            if is_json and ref.key is None and modality == "text":
                raise ValueError(
                    f"{name}: bad value {spec!r}; a json field is metadata, not a caption: "
                    "name the key holding the caption, e.g. json:caption"
                )


def _decode(raw: dict, ext: str) -> str:
    try:
        return raw[ext].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"field {ext!r} of {raw.get('__key__')!r} is not UTF-8") from None


def _json_value(raw: dict, ref: FieldRef, parsed: dict):
    """The value under ref.key (None when absent); each JSON field is parsed once per sample."""
    if ref.ext not in parsed:
        try:
            parsed[ref.ext] = json.loads(_decode(raw, ref.ext))
        except json.JSONDecodeError:
            raise ValueError(f"field {ref.ext!r} of {raw.get('__key__')!r} is not valid JSON") from None
    doc = parsed[ref.ext]
    return doc.get(ref.key) if isinstance(doc, dict) else None


def _texts(value, ref: FieldRef, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ValueError(f"field {str(ref)!r} of {key!r} holds {shown}, not a string or a list of strings")


def captions_from_sample(raw: dict, refs: list[FieldRef], lines: bool = False) -> list[str] | None:
    """Non-empty, stripped captions of the first entry of `refs` that yields any.

    raw: a sample's fields, extension -> bytes. A plain field is one caption (lines=True: one per
    non-empty line, as benchmark .txt files hold them); a JSON key gives a string or a list.
    An absent field or key (or a JSON null) moves on to the next entry, and so does one that
    holds only blank captions. Returns None when no entry is present at all and [] when the
    present ones are all blank. Raises ValueError, naming the field, for bytes that are not
    UTF-8, JSON that does not parse, or a value that is neither a string nor a list of strings.
    """
    parsed: dict = {}
    present = False
    for ref in refs:
        if ref.ext not in raw:
            continue
        if ref.key is None:
            text = _decode(raw, ref.ext)
            texts = text.splitlines() if lines else [text]
        else:
            value = _json_value(raw, ref, parsed)
            if value is None:
                continue
            texts = _texts(value, ref, raw.get("__key__"))
        present = True
        captions = [t.strip() for t in texts if t.strip()]
        if captions:
            return captions
    return [] if present else None
