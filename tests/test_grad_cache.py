"""GradCache accumulation: micro-batches give the whole batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from mmcontrast.config import AudioTowerConfig, LossConfig, ModelConfig, TermConfig
from mmcontrast.losses import Objective
from mmcontrast.model.multimodal import build_model
from mmcontrast.train import grad_cache
from mmcontrast.train.grad_cache import grad_cache_step, merge_outputs, split_batch
from mmcontrast.train.loop import objective_loss
from tests.test_caption import CAPTIONS, TINY_COCA


def _vit(patch_dropout: float = 0.0) -> dict:
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    return {
        "embed_dim": 32,
        "vision_cfg": vision | ({"patch_dropout": patch_dropout} if patch_dropout else {}),
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


# A timm ViT over the log-mel: LayerNorm only (no batch statistics) and every dropout kind.
AUDIO_VIT = AudioTowerConfig(
    backbone="vit_tiny_patch16_224",
    n_mels=32,
    hop_length=320,
    backbone_kwargs={
        "img_size": [32, 48],
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "dynamic_img_size": True,
        "dynamic_img_pad": True,
    },
)


def _batch(model, b: int, modalities, seed: int = 0, negatives: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(b)]
    batch = {"__key__": [f"s{i}" for i in range(b)], "present": {}}
    if "image" in modalities:
        batch["image"] = torch.randn(b, 3, 32, 32, generator=g)
    batch["text"] = model.tokenizer(captions)
    if "audio" in modalities:
        batch["audio"] = torch.randn(b, 16000, generator=g) * 0.1
    for m in modalities:
        batch["present"][m] = torch.ones(b, dtype=torch.bool)
    if "audio" in modalities:
        batch["present"]["audio"][1::5] = False  # some samples lack audio: masked, not dropped
    if negatives:
        negs = [f"{c} but not {j}" for c in captions for j in range(negatives)]
        batch["text_negatives"] = model.tokenizer(negs).reshape(b, negatives, -1)
        batch["present"]["text_negatives"] = torch.ones(b, negatives, dtype=torch.bool)
        batch["present"]["text_negatives"][2::7, 1] = False  # a missing negative is masked
    return batch


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _whole_batch(model, objective, batch, pieces: int = 1):
    """Reference: every piece encoded with its graph, one loss over all of them, one backward."""
    model.zero_grad(set_to_none=True)
    outputs = merge_outputs([model(p, **objective.forward_kwargs) for p in split_batch(batch, pieces)])
    loss, _ = objective_loss(objective, outputs, batch["present"])
    loss.backward()
    return loss.detach(), _grads(model)


def _grad_cached(model, objective, batch, pieces: int):
    model.zero_grad(set_to_none=True)
    loss, parts = grad_cache_step(
        lambda piece: model(piece, **objective.forward_kwargs),
        lambda outputs: objective_loss(objective, outputs, batch["present"]),
        batch,
        pieces,
        lambda surrogate: surrogate.backward(),
        model=model,
    )
    return loss, _grads(model)


def _assert_grads_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item()
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= rel * max(scale, 1e-6), f"{name}: max diff {diff:.3g} vs max |grad| {scale:.3g}"


def _setup(clip, terms, modalities, audio=None, bias=None, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(clip=clip, audio=audio, init_logit_bias=bias)
    model = build_model(cfg, modalities).train()
    objective = Objective.from_config(LossConfig(terms=terms), modalities)
    return model, objective


def test_four_micro_batches_equal_one_batch_of_four_times_b_without_dropout():
    # info_nce + siglip (shared logit scale and bias) + negclip (per-sample (b, k, d) outputs)
    modalities = ["image", "text"]
    terms = [
        TermConfig(name="info_nce"),
        TermConfig(name="siglip", weight=0.5),
        TermConfig(name="negclip", weight=0.5),
    ]
    model, objective = _setup(_vit(), terms, modalities, bias=-10.0)
    batch = _batch(model, 16, modalities, negatives=2)
    want_loss, want = _whole_batch(model, objective, batch)  # one plain forward of 4b
    got_loss, got = _grad_cached(model, objective, batch, pieces=4)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert "clip.logit_scale" in got and "clip.logit_bias" in got
    _assert_grads_close(got, want)


def test_dropout_and_patch_dropout_are_replayed_exactly():
    modalities = ["image", "text", "audio"]
    audio = AudioTowerConfig(
        **{
            **AUDIO_VIT.__dict__,
            "backbone_kwargs": {
                **AUDIO_VIT.backbone_kwargs,
                "drop_rate": 0.3,
                "attn_drop_rate": 0.2,
                "proj_drop_rate": 0.2,
                "drop_path_rate": 0.2,
            },
        }
    )
    model, objective = _setup(_vit(patch_dropout=0.5), [TermConfig(name="info_nce")], modalities, audio=audio)
    batch = _batch(model, 16, modalities)

    torch.manual_seed(123)
    want_loss, want = _whole_batch(model, objective, batch, pieces=4)
    torch.manual_seed(123)
    got_loss, got = _grad_cached(model, objective, batch, pieces=4)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_grads_close(got, want)

    # Randomness really is there: another seed draws other masks and another loss.
    torch.manual_seed(321)
    other_loss, _ = _whole_batch(model, objective, batch, pieces=4)
    assert abs(other_loss.item() - want_loss.item()) > 1e-4


def test_rerun_without_rng_replay_gives_other_gradients(monkeypatch):
    """open_clip's accumulation: the second pass draws fresh masks, so gradients differ."""
    modalities = ["image", "text"]
    model, objective = _setup(_vit(patch_dropout=0.5), [TermConfig(name="info_nce")], modalities)
    batch = _batch(model, 16, modalities)
    torch.manual_seed(123)
    _, want = _whole_batch(model, objective, batch, pieces=4)
    monkeypatch.setattr(grad_cache.RngState, "restore", lambda self: None)
    torch.manual_seed(123)
    _, got = _grad_cached(model, objective, batch, pieces=4)
    with pytest.raises(AssertionError):
        _assert_grads_close(got, want)


def test_coca_caption_sums_accumulate_exactly():
    modalities = ["image", "text"]
    terms = [TermConfig(name="info_nce"), TermConfig(name="caption", weight=2.0)]
    model, objective = _setup(TINY_COCA, terms, modalities)
    batch = _batch(model, 8, modalities)  # ragged captions: token counts differ per micro-batch
    want_loss, want = _whole_batch(model, objective, batch)
    got_loss, got = _grad_cached(model, objective, batch, pieces=4)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_grads_close(got, want)


def test_batchnorm_running_stats_move_once_per_micro_batch():
    modalities = ["image", "text", "audio"]
    audio = AudioTowerConfig(backbone="resnet10t", n_mels=32, hop_length=320)
    model, objective = _setup(_vit(), [TermConfig(name="info_nce")], modalities, audio=audio)
    batch = _batch(model, 8, modalities)
    norm = next(m for m in model.towers["audio"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    _whole_batch(model, objective, batch, pieces=2)
    after_reference = norm.num_batches_tracked.item()
    _grad_cached(model, objective, batch, pieces=2)
    assert norm.num_batches_tracked.item() - after_reference == 2  # the replays, not the cache pass


def test_split_batch_refuses_uneven_pieces():
    with pytest.raises(ValueError, match="cannot be split into 3"):
        split_batch({"__key__": ["a", "b", "c", "d"], "text": torch.zeros(4, 2)}, 3)


def test_activation_checkpointing_recomputes_with_the_same_masks(monkeypatch):
    """open_clip's and timm's checkpointing: same gradients (dropout included), and it runs."""
    import open_clip.transformer
    import timm.models.vision_transformer

    calls = {"n": 0}
    for module, name in [
        (open_clip.transformer, "checkpoint"),
        (timm.models.vision_transformer, "checkpoint_seq"),
    ]:
        original = getattr(module, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    modalities = ["image", "text", "audio"]
    audio = AudioTowerConfig(
        **{**AUDIO_VIT.__dict__, "backbone_kwargs": {**AUDIO_VIT.backbone_kwargs, "drop_rate": 0.3}}
    )
    model, objective = _setup(_vit(patch_dropout=0.5), [TermConfig(name="info_nce")], modalities, audio=audio)
    batch = _batch(model, 8, modalities)
    torch.manual_seed(5)
    want_loss, want = _whole_batch(model, objective, batch)
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    got_loss, got = _whole_batch(model, objective, batch)
    assert calls["n"] == 4  # 2 image blocks, 1 text block, the audio ViT's block sequence
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_grads_close(got, want)


def test_random_draws_of_the_loss_advance_from_step_to_step():
    """Symile's shuffled negatives are drawn inside the loss: GradCache leaves the RNG where the
    whole-batch step leaves it (after the loss's draws), so the next step draws other ones."""
    modalities = ["image", "text"]
    model, objective = _setup(_vit(), [TermConfig(name="symile", options={"negatives": "n"})], modalities)
    batch = _batch(model, 16, modalities)

    torch.manual_seed(7)
    _whole_batch(model, objective, batch, pieces=4)
    want_state = torch.get_rng_state()
    torch.manual_seed(7)
    first, _ = _grad_cached(model, objective, batch, pieces=4)
    assert torch.equal(torch.get_rng_state(), want_state)
    second, _ = _grad_cached(model, objective, batch, pieces=4)  # same weights, same batch
    assert abs(second.item() - first.item()) > 1e-4  # other permutations, another loss
