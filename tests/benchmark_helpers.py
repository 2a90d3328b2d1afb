"""Hand-made benchmark folders with known answers, and a model whose embeddings are known.

ColourModel sees colours: an image embeds as its mean RGB, a text as the sum of the colour words it
names (yellow = red + green, ...), a sound as its energy at three tones (red, green, blue). So every
score, and every right or wrong answer, can be worked out by hand.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmcontrast.data.benchmark import write_benchmark

RGB = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "cyan": (0, 1, 1),
    "magenta": (1, 0, 1),
}
CLASSNAMES = list(RGB)
TONES_HZ = (300.0, 500.0, 700.0)  # red, green, blue: whole periods in 0.25 s at 16 kHz
SAMPLE_RATE = 16000
NUM_SAMPLES = 4000


class ColourModel(nn.Module):
    """The evaluation interface (encode, modalities, embed_dim, tokenizer) with known embeddings."""

    def __init__(self, nan: bool = False):
        super().__init__()
        self.modalities = ["image", "text", "audio"]
        self.embed_dim = 3
        self.nan = nan
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the runner a device and dtype to read

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) / 255.0)

    @staticmethod
    def tokenizer(texts) -> torch.Tensor:
        rows = []
        for text in texts:
            counts = [len(re.findall(rf"\b{name}\b", text.lower())) for name in RGB]
            rows.append(
                [sum(n * RGB[name][i] for n, name in zip(counts, RGB, strict=True)) for i in range(3)]
            )
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality == "audio":
            spectrum = torch.fft.rfft(x.float()).abs()
            x = spectrum[:, [round(f * x.shape[1] / SAMPLE_RATE) for f in TONES_HZ]]
        out = F.normalize(x.float(), dim=-1)
        return out * float("nan") if self.nan else out


def png(colour, size: int = 8) -> bytes:
    rgb = RGB[colour] if isinstance(colour, str) else colour
    image = Image.new("RGB", (size, size), tuple(int(255 * c) for c in rgb))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tone(colours: list[str], sample_rate: int = SAMPLE_RATE, channels: int = 1, fmt: str = "FLAC") -> bytes:
    t = np.arange(int(0.25 * sample_rate)) / sample_rate
    wave = sum(0.3 * np.sin(2 * np.pi * TONES_HZ[CLASSNAMES.index(c)] * t) for c in colours)
    data = np.stack([wave] * channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format=fmt, subtype="PCM_16" if fmt == "FLAC" else "FLOAT")
    return buf.getvalue()


def image_classes(out, extra=()):
    """4 of 6 right at top-1 (a red image labelled yellow; a white image labelled red), 5 at top-5."""
    rows = [("red", 0), ("green", 1), ("blue", 2), ("yellow", 3), ("red", 3), ((1, 1, 1), 0)]
    samples = [{"__key__": f"img{i}", "png": png(c), "cls": str(label)} for i, (c, label) in enumerate(rows)]
    return write_benchmark(out, "classification", [*samples, *extra], CLASSNAMES, ["a photo of {c}.", "{c}"])


def audio_classes(out):
    """Clips at 48 kHz stereo, 8 kHz mono and 16 kHz: 3 of 4 right (a blue tone labelled red)."""
    rows = [
        (tone(["red"], 48000, channels=2), "flac", 0),
        (tone(["green"], 8000, fmt="WAV"), "wav", 1),
        (tone(["red", "green"]), "flac", 3),
        (tone(["blue"]), "flac", 0),
    ]
    samples = [
        {"__key__": f"snd{i}", ext: data, "cls": str(label)} for i, (data, ext, label) in enumerate(rows)
    ]
    return write_benchmark(out, "classification", samples, CLASSNAMES, ["the sound of {c}"])


def retrieval(out, extra=()):
    """Several captions per sample, one caption shared by two samples (image s0 and s4)."""
    rows = [
        ("red", "a red square\nred things"),
        ("green", "green\ngreen and red"),
        ("blue", "blue"),
        ("yellow", "yellow"),
        ("red", "red things"),
    ]
    samples = [{"__key__": f"r{i}", "png": png(c), "txt": t} for i, (c, t) in enumerate(rows)]
    return write_benchmark(out, "retrieval", [*samples, *extra], samples_per_shard=3)


def composition(out):
    rows = [
        ("red", "a red ball", ["a green ball"], "replace_att"),  # right
        ("red", "a red ball", ["a red box"], "replace_obj"),  # a tie: wrong
        ("yellow", "a yellow ball", ["a red ball", "a green ball"], "replace_att"),  # right
        ("green", "red", ["green"], "replace_att"),  # wrong
    ]
    samples = [
        {
            "__key__": f"c{i}",
            "png": png(c),
            "json": json.dumps({"positive": p, "negatives": n, "category": k}),
        }
        for i, (c, p, n, k) in enumerate(rows)
    ]
    return write_benchmark(out, "composition", samples)
