"""Caption generation with open_clip's `CoCa.generate` (captioning benchmarks and `mmcontrast caption`).

`generate_captions` is what `mmcontrast caption` and the caption evaluation call; it is a thin
mapping from a strategy name to open_clip's generation arguments, so captions from an export
loaded by open_clip itself are the same for the same images, strategy and seed.
"""

from __future__ import annotations

import open_clip
import torch

# strategy -> open_clip generate() arguments; greedy is top-k sampling with k = 1
STRATEGIES = {
    "greedy": {"generation_type": "top_k", "top_k": 1},
    "top_k": {"generation_type": "top_k", "top_k": 5},
    "top_p": {"generation_type": "top_p", "top_p": 0.9},
    "beam": {"generation_type": "beam_search", "num_beams": 6, "num_beam_groups": 3},
}
DEFAULT_MAX_TOKENS = 30  # open_clip's seq_len default, start and end tokens included
# open_clip's own default (5) bans the end token before four words, which appends words to
# a short caption such as "a red circle"; 2 asks for one word at least
DEFAULT_MIN_TOKENS = 2


def generation_kwargs(
    strategy: str,
    context_length: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    temperature: float = 1.0,
) -> dict:
    """open_clip CoCa.generate keyword arguments for a strategy name."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown caption strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    # the decoder's causal mask and the text tower's positions end at the context length
    seq_len = min(max_tokens, context_length)
    if not 1 <= min_tokens < seq_len:
        raise ValueError(f"min_tokens must be in [1, {seq_len}) (max tokens), got {min_tokens}")
    return {**STRATEGIES[strategy], "seq_len": seq_len, "min_seq_len": min_tokens, "temperature": temperature}


def decode_caption(tokens: torch.Tensor) -> str:
    """Token ids (with start, end and padding) -> the caption text."""
    text = open_clip.decode(tokens)
    return text.split("<end_of_text>")[0].replace("<start_of_text>", "").strip()


@torch.no_grad()
def generate_captions(
    coca, images: torch.Tensor, strategy: str = "greedy", seed: int = 0, **kwargs
) -> list[str]:
    """One caption per image from an open_clip CoCa model (images already preprocessed).

    `seed` seeds torch's RNG before generating, so sampling strategies are reproducible; kwargs
    go to generation_kwargs (max_tokens, min_tokens, temperature).
    """
    if not hasattr(coca, "generate") or not hasattr(coca, "text_decoder"):
        raise ValueError("captions need a CoCa model (an export of a run with a model.clip multimodal_cfg)")
    was_training = coca.training
    coca.eval()
    try:
        torch.manual_seed(seed)
        dtype = next(coca.parameters()).dtype
        tokens = coca.generate(
            images.to(next(coca.parameters()).device, dtype=dtype),
            **generation_kwargs(strategy, coca.context_length, **kwargs),
        )
    finally:
        coca.train(was_training)
    return [decode_caption(row) for row in tokens.cpu()]


def load_images(paths, preprocess) -> torch.Tensor:
    """Image files -> a preprocessed batch; an unreadable file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(preprocess(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
    return torch.stack(images)


def caption_files(export_dir, paths, strategy: str = "greedy", seed: int = 0, batch_size: int = 64, **kwargs):
    """[(path, caption)] for image files, from an exported CoCa model (`mmcontrast caption`)."""
    from mmcontrast.export import load_exported

    model = load_exported(export_dir)
    if not hasattr(model.clip, "text_decoder"):
        raise ValueError(f"{export_dir} is not a CoCa export: its open_clip model has no text decoder")
    generation_kwargs(strategy, model.clip.context_length, **kwargs)  # refuse bad options before reading
    captions = []
    for start in range(0, len(paths), batch_size):
        images = load_images(paths[start : start + batch_size], model.preprocess)
        captions += generate_captions(model.clip, images, strategy, seed=seed + start, **kwargs)
    return list(zip(paths, captions, strict=True))
