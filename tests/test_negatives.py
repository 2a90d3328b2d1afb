"""Negative captions: demo-world categories from metadata, and rules for any English caption."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from mmcontrast.data.demo import make_sample, render_caption
from mmcontrast.data.negatives import DEMO_CATEGORIES, demo_negatives, lexicon_tagger, rule_negatives

# Real-world-style captions (COCO / Flickr-like), written by hand.
CAPTIONS = [
    "A man in a red shirt is riding a brown horse.",
    "two small dogs playing with a big ball on the green grass",
    "A wooden table with an empty glass bottle",
    "The cat sat on the mat",
    "A woman holding a black umbrella in the rain.",
    "a white plate of food next to a fork and a knife",
    "A large elephant standing near a small tree.",
    "Three young children are sitting on a wooden bench.",
    "A yellow bus parked in front of a tall building",
    "a close up of a pizza with cheese and tomatoes",
    "An old man reading a newspaper on a park bench.",
    "A dog catches a frisbee in the air",
    "A red stop sign on the corner of a street.",
    "two zebras grazing in a dry field",
    "A plate with a sandwich and a cup of coffee",
    "A little girl in a pink dress holding a white kitten.",
    "A boat floating on a calm blue lake at sunset",
    "a bathroom with a white sink and a large mirror",
    "A skateboarder doing a trick on a metal rail.",
    "a bowl of green apples on a kitchen counter",
    "A black and white photo of a train station",
    "Someone is cutting a cake with a long knife",
    "A kite flying high over the beach",
    "a tiny bird perched on a thin branch",
    "A computer monitor sitting on top of a wooden desk",
    "A giraffe eating leaves from a tall tree.",
    "A group of people standing around a big table",
    "an empty street at night with wet pavement",
    "A person wearing a striped shirt and blue jeans",
    "The sky is clear",
    "Sunset.",
    "dog",
    "A a a",
    "Is it?",
]
SWAPS = ("swap_att", "swap_obj", "shuffle")


def _words(text: str) -> Counter:
    return Counter(w.lower() for w in text.replace(".", " ").replace(",", " ").replace("?", " ").split())


@pytest.mark.parametrize("caption", CAPTIONS)
def test_rule_negatives_differ_keep_words_and_are_never_empty(caption):
    for seed in range(5):
        negatives = rule_negatives(caption, random.Random(seed))
        for kind, negative in negatives.items():
            assert negative.strip(), (kind, caption)
            assert negative.lower() != caption.lower(), (kind, caption)
            if kind in SWAPS:
                assert _words(negative) == _words(caption), (kind, caption, negative)
            else:  # a replacement changes exactly one word
                changed = sum((_words(caption) - _words(negative)).values())
                assert changed == 1, (kind, caption, negative)


def test_rule_negatives_find_what_is_there():
    """Across the hand-written captions every kind is produced often, and the obvious cases work."""
    produced = Counter(k for c in CAPTIONS for k in rule_negatives(c, random.Random(0)))
    assert produced["swap_att"] >= 8 and produced["swap_obj"] >= 15
    assert produced["shuffle"] >= len(CAPTIONS) - 4 and produced["replace_att"] >= 20
    out = rule_negatives("A man in a red shirt is riding a brown horse.", random.Random(0))
    assert out["swap_att"] == "A man in a brown shirt is riding a red horse."
    assert rule_negatives("Sunset.") == {} and rule_negatives("dog") == {} and rule_negatives("") == {}
    assert "shuffle" not in rule_negatives("A a a")  # no other order exists


def test_replace_attribute_stays_within_its_kind():
    from mmcontrast.data.negatives import ATTRIBUTE_KIND

    for seed in range(20):
        out = rule_negatives("a red car", random.Random(seed))["replace_att"]
        new = out.split()[1]
        assert new != "red" and ATTRIBUTE_KIND[new] == "color"


def test_a_pos_tagger_can_replace_the_lexicon():
    """The spaCy path plugs a tagger in; a stand-in tagger shows its tags are what is used."""

    def tagger(words):
        return ["NOUN" if w in ("cat", "mat") else "ADJ" if w in ("fat", "flat") else "OTHER" for w in words]

    out = rule_negatives("the fat cat on the flat mat", random.Random(0), tagger=tagger)
    assert out["swap_obj"] == "the fat mat on the flat cat"
    assert out["swap_att"] == "the flat cat on the fat mat"
    assert "replace_att" not in out  # "fat" and "flat" are not lexicon attributes
    assert lexicon_tagger(["a", "red", "car"]) == ["OTHER", "ADJ", "NOUN"]


def test_demo_negatives_by_category():
    pair = {
        "caption_template": "{a} to the left of {b}",
        "objects": [{"color": "red", "shape": "circle"}, {"color": "orange", "shape": "star"}],
    }
    out = demo_negatives(pair, random.Random(0))
    assert out["swap_att"] == "an orange circle to the left of a red star"
    assert out["swap_obj"] == "a red star to the left of an orange circle"
    assert out["replace_rel"] == "a red circle to the right of an orange star"
    assert set(out) == set(DEMO_CATEGORIES)
    single = {"caption_template": "a single {o}", "objects": [{"color": "red", "shape": "circle"}]}
    out = demo_negatives(single, random.Random(0))
    assert set(out) == {"replace_att", "replace_obj"}
    assert out["replace_att"].endswith(" circle") and out["replace_obj"].startswith("a single red ")
    # nothing to swap when both objects share the attribute; no relation in "a and b"
    same_colour = {
        "caption_template": "{a} and {b}",
        "objects": [{"color": "red", "shape": "circle"}, {"color": "red", "shape": "star"}],
    }
    assert set(demo_negatives(same_colour)) == {"swap_obj", "replace_att", "replace_obj"}


def test_demo_negatives_on_generated_samples_are_wrong_captions():
    import json

    rng = np.random.default_rng(0)
    for i in range(300):
        sample = make_sample(str(i), rng)
        meta = json.loads(sample["json"])
        truth = sample["txt"].decode()
        assert render_caption(meta["caption_template"], meta["objects"]) == truth
        for category, negative in demo_negatives(meta, random.Random(i)).items():
            assert negative != truth and negative, category


class _BagOfWords:
    """A text encoder that ignores word order: swaps cannot be told apart, replacements can."""

    def __init__(self):
        self.words: dict[str, int] = {}

    class _Texts(list):
        def to(self, device):
            return self

    def tokenizer(self, texts):
        return self._Texts(texts)

    def encode(self, modality, texts):
        import torch

        vectors = torch.zeros(len(texts), 64)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                vectors[i, self.words.setdefault(word, len(self.words))] += 1.0
        return torch.nn.functional.normalize(vectors, dim=1)


def test_composition_benchmark_by_hand(tmp_path):
    """The demo's composition benchmark scored with a bag-of-words model whose image embedding is
    its true caption's: replacements are always caught, swaps never (a tie is no win), and single
    objects have no swap or relation rows."""
    import json

    import torch

    from mmcontrast.data.demo import write_demo_world
    from mmcontrast.eval.benchmark import read_benchmark
    from mmcontrast.eval.tasks import composition
    from tests.test_eval import _raw_samples

    world = write_demo_world(tmp_path / "world", 0, 60, seed=1, samples_per_shard=60)
    folder = next(d for d in world["benchmark_dirs"] if d.endswith("demo-composition"))
    assert read_benchmark(folder).task == "composition"
    specs = [json.loads(s["json"]) for s in _raw_samples(folder)]
    model = _BagOfWords()
    positive = model.encode("text", [s["positive"] for s in specs])
    negatives = model.encode("text", [n for s in specs for n in s["negatives"]])
    owner = torch.tensor([i for i, s in enumerate(specs) for _ in s["negatives"]])
    metrics = composition(positive, positive, negatives, owner, [s["category"] for s in specs])
    assert metrics["replace_att"] == 1.0 and metrics["replace_obj"] == 1.0
    assert metrics["swap_att"] == 0.0 and metrics["swap_obj"] == 0.0
    # "to the left of" -> "to the right of" changes a word; "on the left .., on the right .." swaps two
    relations = [s["positive"] for s in specs if s["category"] == "replace_rel"]
    one_word = sum(not ("left" in t and "right" in t) for t in relations)
    assert metrics["replace_rel"] == pytest.approx(one_word / len(relations))
    assert 0 < one_word < len(relations)
    assert metrics["replace_att/n"] == 60 and metrics["swap_obj/n"] < 60
