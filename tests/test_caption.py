"""The caption term against open_clip's CoCaLoss and CoCa model, in one process and on 2 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import CoCaLoss

from mmcontrast.config import ConfigError, LossConfig, TermConfig, load_config
from mmcontrast.losses import Objective
from mmcontrast.losses.caption import caption_loss, caption_token_nll
from mmcontrast.model.multimodal import MultimodalModel
from tests.distributed import run_ranks

# A CoCa small enough for unit tests: open_clip's CoCa needs embed_dim == decoder width.
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 1,
        "head_width": 16,
        "attentional_pool": True,
        "attn_pooler_heads": 2,
        "attn_pooler_queries": 9,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 12,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "custom_text": True,
}
CAPTIONS = [
    "a red circle",
    "a blue star to the left of a green square",
    "x",
    "on the left a purple triangle, on the right an orange star and some more words than fit",
    "",
    "a photo of a yellow square",
]


def _padded_labels(b, length, vocab, seed):
    """Random next-token labels with ragged padding (0), one row entirely padding."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, vocab, (b, length), generator=g)
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    lengths[0] = 0
    lengths[-1] = length
    return labels.masked_fill(torch.arange(length)[None, :] >= lengths[:, None], 0)


def _hidden_weight(b, length, width, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, width, generator=g), torch.randn(width, vocab, generator=g) / width**0.5


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_caption_term_equals_coca_loss_caption_part(chunk):
    b, length, width, vocab = 6, 11, 16, 997
    hidden, weight = _hidden_weight(b, length, width, vocab, seed=1)
    labels = _padded_labels(b, length, vocab, seed=2)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    ours = caption_loss(*caption_token_nll(h1, w1, labels, pad_id=0, chunk=chunk))
    coca = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=0)
    ref = coca.caption_loss((h2 @ w2).permute(0, 2, 1), labels)  # the caption part of CoCaLoss.forward
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_samples_without_image_or_text_leave_no_tokens():
    hidden, weight = _hidden_weight(5, 6, 8, 50, seed=3)
    labels = _padded_labels(5, 6, 50, seed=4)
    valid = torch.tensor([True, False, True, True, False])
    nll, tokens = caption_token_nll(hidden, weight, labels, valid=valid)
    ref = F.cross_entropy((hidden[valid] @ weight).permute(0, 2, 1), labels[valid], ignore_index=0)
    assert tokens == (labels[valid] != 0).sum()
    torch.testing.assert_close(caption_loss(nll, tokens), ref, rtol=0, atol=1e-6)
    # nothing to caption: zero loss that still backpropagates (every rank must call backward)
    h = hidden.clone().requires_grad_()
    empty = caption_loss(*caption_token_nll(h, weight, labels, valid=torch.zeros(5, dtype=torch.bool)))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_bf16_inputs_are_computed_in_float32():
    hidden, weight = _hidden_weight(4, 9, 16, 300, seed=5)
    labels = _padded_labels(4, 9, 300, seed=6)
    hb = hidden.bfloat16().requires_grad_()
    wb = weight.bfloat16().requires_grad_()
    ours = caption_loss(*caption_token_nll(hb, wb, labels))
    ref = F.cross_entropy((hb.float() @ wb.float()).permute(0, 2, 1), labels, ignore_index=0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    ours.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def _tiny_coca_batch(model, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    text = model.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(n)])
    ones = torch.ones(n, dtype=torch.bool)
    return {"image": images, "text": text, "present": {"image": ones, "text": ones.clone()}}


def _coca_objective():
    terms = [TermConfig("info_nce", 1.0, "all"), TermConfig("caption", 2.0, "all")]
    return Objective.from_config(LossConfig(terms), ["image", "text"])


def test_coca_model_objective_equals_open_clip_coca_loss():
    """Through the whole model: our chunked pass vs open_clip's CoCa.forward + CoCaLoss
    (contrastive weight 1, caption weight 2, the paper's), values and every gradient."""
    torch.manual_seed(0)
    model = MultimodalModel(TINY_COCA, {}, ("image", "text"))
    batch = _tiny_coca_batch(model)
    objective = _coca_objective()
    assert objective.forward_kwargs["captions"] is True

    out = model(batch, **{**objective.forward_kwargs, "caption_chunk": 5})
    total, parts = objective(out, batch["present"], model.logit_scale())
    total.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref_out = model.clip(batch["image"], batch["text"])
    clip_part, caption_part = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        ref_out["image_features"],
        ref_out["text_features"],
        ref_out["logits"],
        ref_out["labels"],
        model.logit_scale(),
    )
    (clip_part + caption_part).backward()
    # the model path multiplies only non-padding rows: float32 rounding differs by ~1 ulp
    torch.testing.assert_close(parts["caption/image-text"], caption_part.detach() / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["info_nce/image-text"], clip_part.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, clip_part + caption_part, rtol=1e-6, atol=1e-5)
    assert "text_decoder.text_projection" in {n.removeprefix("clip.") for n in ours}
    for name, p in model.named_parameters():
        if p.grad is not None:
            rel = (ours[name] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
            assert rel < 1e-5, (name, rel.item())


def _coca_ranks(rank, world, sizes):
    """Rank's share of the batch, captions of unequal lengths -> (loss, parameter gradients)."""
    torch.manual_seed(0)
    model = MultimodalModel(TINY_COCA, {}, ("image", "text"))
    full = _tiny_coca_batch(model, n=sum(sizes), seed=1)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    batch = {
        "image": full["image"][rows],
        "text": full["text"][rows],
        "present": {m: v[rows] for m, v in full["present"].items()},
    }
    objective = _coca_objective()
    total, _ = objective(model(batch, **objective.forward_kwargs), batch["present"], model.logit_scale())
    total.backward()
    return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_two_gloo_ranks_equal_one_process_on_concatenated_batch():
    sizes = (2, 5)  # unequal samples and unequal caption tokens per rank
    single_loss, single_grads = _coca_ranks(0, 1, (sum(sizes),))
    ranks = run_ranks(2, _coca_ranks, sizes)
    assert abs(sum(r[0] for r in ranks) / 2 - single_loss) < 1e-5
    for name, grad in single_grads.items():
        averaged = sum(r[1][name] for r in ranks) / 2
        rel = (averaged - grad).norm() / grad.norm().clamp_min(1e-12)
        assert rel < 1e-5, (name, rel.item(), (averaged - grad).abs().max().item())


def test_caption_term_needs_a_coca_model_and_image_text(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  terms:\n    - {name: caption, weight: 2.0}\n")
    with pytest.raises(ConfigError, match="model.clip.*CoCa"):
        load_config(path)
    path.write_text(
        "model:\n  clip: coca_ViT-B-32\nloss:\n  terms:\n    - {name: caption, pairs: [[text, image]]}\n"
    )
    with pytest.raises(ConfigError, match="pairs"):
        load_config(path)
    model = MultimodalModel(_plain_clip(), {}, ("image", "text"))
    with pytest.raises(ValueError, match="captions need a CoCa model"):
        model(
            {"image": torch.zeros(1, 3, 32, 32), "text": torch.zeros(1, 12, dtype=torch.long)}, captions=True
        )


def _plain_clip():
    cfg = {k: v for k, v in TINY_COCA.items() if k not in ("multimodal_cfg", "custom_text")}
    cfg["vision_cfg"] = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    cfg["text_cfg"] = {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return cfg
