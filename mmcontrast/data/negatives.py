"""Hard-negative captions: a caption that differs from the true one in composition only.

Three sources, one output shape (a list of strings per sample):

    demo_negatives(meta)      from demo-world metadata, one per SugarCrepe-style category
    rule_negatives(caption)   for any English caption, by rule (no model download); an optional
                              spaCy tagger replaces the built-in lexicon when one is installed
    neg.json in a shard       mined offline (e.g. by an LLM); `mmcontrast negatives` writes them
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable

from mmcontrast.data.demo import COLORS, SHAPES, render_caption

DEMO_CATEGORIES = ("swap_att", "swap_obj", "replace_att", "replace_obj", "replace_rel")
_RELATION_SWAPS = {"left": "right", "right": "left"}


def sample_rng(key: str) -> random.Random:
    """The generator behind a sample's negatives: seeded by its key, so a sample gets the same
    negatives on the fly, in a written neg.json and in the compositional benchmark."""
    return random.Random(zlib.crc32(key.encode("utf-8")))


# ---------------------------------------------------------------- demo world


def _swap_words(template: str, swaps: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(swaps) + r")\b", lambda m: swaps[m.group(1)], template)


def demo_negatives(meta: dict, rng: random.Random | None = None) -> dict[str, str]:
    """{category: negative caption} for a demo sample's metadata; categories that do not apply
    (swaps and relations need two objects; a relation needs a left/right template) are absent.

    swap_att    the two objects' colours exchanged      replace_att  one colour replaced
    swap_obj    the two objects' shapes exchanged       replace_obj  one shape replaced
    replace_rel left <-> right in the relation
    """
    rng = rng or random.Random(0)
    template, objects = meta["caption_template"], [dict(o) for o in meta["objects"]]
    truth = render_caption(template, objects)
    out = {}
    if len(objects) == 2:
        a, b = objects
        if a["color"] != b["color"]:
            out["swap_att"] = render_caption(
                template, [{**a, "color": b["color"]}, {**b, "color": a["color"]}]
            )
        if a["shape"] != b["shape"]:
            out["swap_obj"] = render_caption(
                template, [{**a, "shape": b["shape"]}, {**b, "shape": a["shape"]}]
            )
        if re.search(r"\b(left|right)\b", template):
            out["replace_rel"] = render_caption(_swap_words(template, _RELATION_SWAPS), objects)
    i = rng.randrange(len(objects))
    for category, key, values in (("replace_att", "color", COLORS), ("replace_obj", "shape", SHAPES)):
        changed = [dict(o) for o in objects]
        changed[i][key] = rng.choice([v for v in values if v != objects[i][key]])
        out[category] = render_caption(template, changed)
    return {k: v for k, v in out.items() if v != truth}


# ---------------------------------------------------------------- any English caption

# Attribute words by kind: a replacement stays within its kind ("red" -> "blue", not "wooden").
ATTRIBUTES = {
    "color": (
        "red green blue yellow purple orange black white gray grey brown pink golden silver "
        "dark light beige".split()
    ),
    "size": "big small large tiny huge little tall short long wide narrow giant".split(),
    "material": "wooden metal plastic glass stone leather paper cotton brick concrete".split(),
    "state": "open closed empty full wet dry old new young broken clean dirty".split(),
    "pattern": "striped spotted checkered plain dotted".split(),
}
ATTRIBUTE_KIND = {w: kind for kind, words in ATTRIBUTES.items() for w in words}
# Words that are never nouns here, so a lexicon-free noun guess stays conservative.
_FUNCTION_WORDS = set(
    "a an the this that these those some two three four five several many of in on at to with by from "
    "near next behind under over above below beside between into onto and or but while is are was "
    "were be being been has have had it its his her their there here very one each other another "
    "left right front top bottom side middle who which what as for up down out off through".split()
)
_DETERMINERS = set(
    "a an the this that these those some two three four five several many his her their its".split()
)
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|[^\sA-Za-z]+")


def lexicon_tagger(words: list[str]) -> list[str]:
    """A tiny POS guess: ADJ for lexicon attributes, NOUN for a content word right after a
    determiner or an attribute ("a man", "red shirt"), else OTHER."""
    tags = []
    for i, w in enumerate(words):
        lw = w.lower()
        prev = words[i - 1].lower() if i else ""
        if lw in ATTRIBUTE_KIND:
            tags.append("ADJ")
        elif lw.isalpha() and lw not in _FUNCTION_WORDS and (prev in _DETERMINERS or prev in ATTRIBUTE_KIND):
            tags.append("NOUN")
        else:
            tags.append("OTHER")
    return tags


def spacy_tagger(model: str = "en_core_web_sm") -> Callable[[list[str]], list[str]]:
    """A tagger from an installed spaCy English model (never downloaded here)."""
    try:
        import spacy
        from spacy.tokens import Doc

        nlp = spacy.load(model)
    except (ImportError, OSError) as exc:
        raise RuntimeError(f"spaCy model {model!r} is not installed: {exc}") from exc

    def tag(words: list[str]) -> list[str]:
        doc = nlp(Doc(nlp.vocab, words=words))
        return [t.pos_ if t.pos_ in ("ADJ", "NOUN") else "OTHER" for t in doc]

    return tag


def _join(words: list[str]) -> str:
    text = " ".join(words)
    return re.sub(r"\s+([,.;:!?])", r"\1", text)


def _swap_pair(words, positions, rng) -> list[str] | None:
    """Swap two positions holding different words; None when every candidate word is the same."""
    pairs = [
        (i, j)
        for k, i in enumerate(positions)
        for j in positions[k + 1 :]
        if words[i].lower() != words[j].lower()
    ]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    out = list(words)
    out[i], out[j] = out[j], out[i]
    return out


def rule_negatives(
    caption: str, rng: random.Random | None = None, tagger: Callable[[list[str]], list[str]] = lexicon_tagger
) -> dict[str, str]:
    """{kind: negative} for an English caption; kinds that find nothing to change are absent.

    swap_att     two different attribute words exchanged (word multiset kept)
    swap_obj     two different nouns exchanged (word multiset kept)
    shuffle      the words in another order (word multiset kept)
    replace_att  one attribute word replaced by another of its kind (colour by colour, ...)
    Every negative differs from the caption and is non-empty.
    """
    rng = rng or random.Random(0)
    words = _WORD.findall(caption)
    if not words:
        return {}
    tags = tagger(words)
    out = {}
    adjectives = [i for i, t in enumerate(tags) if t == "ADJ"]
    nouns = [i for i, t in enumerate(tags) if t == "NOUN"]
    for kind, positions in (("swap_att", adjectives), ("swap_obj", nouns)):
        swapped = _swap_pair(words, positions, rng)
        if swapped is not None:
            out[kind] = _join(swapped)
    alpha = [i for i, w in enumerate(words) if w.isalpha()]
    if len({words[i].lower() for i in alpha}) > 1:
        for _ in range(10):  # a random order that differs from the caption's
            order = list(alpha)
            rng.shuffle(order)
            shuffled = list(words)
            for dst, src in zip(alpha, order, strict=True):
                shuffled[dst] = words[src]
            if [w.lower() for w in shuffled] != [w.lower() for w in words]:
                out["shuffle"] = _join(shuffled)
                break
    replaceable = [i for i in adjectives if words[i].lower() in ATTRIBUTE_KIND]
    if replaceable:
        i = rng.choice(replaceable)
        kind = ATTRIBUTE_KIND[words[i].lower()]
        options = [
            w for w in ATTRIBUTES[kind] if w not in {words[i].lower(), "gray" if words[i] == "grey" else ""}
        ]
        options = [w for w in options if not {w, words[i].lower()} <= {"gray", "grey"}]
        replaced = list(words)
        replaced[i] = rng.choice(options)
        out["replace_att"] = _join(replaced)
    return {k: v for k, v in out.items() if v and v.lower() != caption.lower()}


# ---------------------------------------------------------------- shards with neg.json


def write_negative_shards(urls: str, out_dir, method: str = "rules", caption_field: str = "txt") -> dict:
    """Copy every shard of `urls` into `out_dir` with a `neg.json` (a JSON list of negative
    captions) added to each sample, made by `method` ("rules" or "demo"). Samples are kept in
    order and otherwise unchanged; those without a readable caption (or demo metadata) are
    written without neg.json and counted. Returns {"shards", "samples", "with_negatives", "skipped"}.
    """
    import json
    import tarfile
    from pathlib import Path

    import webdataset as wds

    from mmcontrast.data.pipeline import expand_sources

    if method not in ("rules", "demo"):
        raise ValueError(f"negatives method must be rules or demo, got {method!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [u for source in expand_sources(urls) for u in source]
    report = {"shards": [], "samples": 0, "with_negatives": 0, "skipped": {}}
    for url in shards:
        target = out_dir / Path(url).name
        if target.resolve() == Path(url).resolve():
            raise ValueError(f"refusing to overwrite the input shard {url}: choose another --out")
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with wds.TarWriter(str(tmp), encoder=False) as writer:
                for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
                    sample = {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}
                    negatives, problem = _sample_negatives(
                        sample, method, caption_field, sample_rng(sample["__key__"])
                    )
                    if problem:
                        report["skipped"][problem] = report["skipped"].get(problem, 0) + 1
                    else:
                        sample["neg.json"] = json.dumps(negatives).encode("utf-8")
                        report["with_negatives"] += 1
                    writer.write(sample)
                    report["samples"] += 1
        except (tarfile.TarError, OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"cannot read shard {url}: {exc}") from exc
        tmp.replace(target)
        report["shards"].append(str(target))
    return report


def _sample_negatives(sample: dict, method: str, caption_field: str, rng) -> tuple[list[str], str | None]:
    import json

    try:
        caption = sample[caption_field].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError, AttributeError):
        return [], "no_caption"
    if method == "demo":
        try:
            meta = json.loads(sample["json"])
            negatives = list(demo_negatives(meta, rng).values())
        except (KeyError, ValueError, TypeError):
            return [], "no_demo_metadata"
    else:
        negatives = list(rule_negatives(caption, rng).values())
    if not negatives:
        return [], "no_negative_found"
    return negatives, None
