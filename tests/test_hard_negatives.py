"""Hard-negative terms against dense reference formulas, in one process and on 2 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcontrast.losses.hard_negatives import (
    hard_negative_mixing,
    hard_negative_nce,
    mix_hard_negatives,
    negclip,
)
from tests.distributed import run_ranks


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def _inputs(n=10, k=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image, text, negatives = _unit(g, n, d), _unit(g, n, d), _unit(g, n, k, d)
    valid = torch.rand(n, generator=g) > 0.2
    valid[0] = True
    negatives_valid = torch.rand(n, k, generator=g) > 0.3
    return image, text, negatives, valid, negatives_valid


# ---------------------------------------------------------------- dense references (float64)


def negclip_dense(image, text, negatives, scale, valid, negatives_valid):
    image, text, negatives = image.double(), text.double(), negatives.double()
    img, txt = image[valid], text[valid]
    neg = negatives[valid][negatives_valid[valid]]
    labels = torch.arange(len(img))
    i2t = F.cross_entropy(scale * img @ torch.cat([txt, neg]).T, labels)
    t2i = F.cross_entropy(scale * txt @ img.T, labels)
    return (i2t + t2i) / 2


def hcl_dense(a, b, scale, beta, tau_plus, valid):
    """Robinson et al.'s formula, written as in the paper's code: importance weights
    exp(beta * s), debiasing with tau_plus, clamp at N e^{-1/t} (1/t = scale)."""
    a, b = a.double()[valid], b.double()[valid]

    def direction(q, k):
        s = scale * q @ k.T
        m = len(q)
        off = ~torch.eye(m, dtype=torch.bool)
        pos = s.diagonal().exp()
        neg = s[off].reshape(m, m - 1).exp()
        n_neg = m - 1
        imp = (beta * neg.log()).exp()
        reweight = (imp * neg).sum(-1) / imp.mean(-1)
        ng = (-tau_plus * n_neg * pos + reweight) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n_neg * math.exp(-float(scale.detach())))
        return (-torch.log(pos / (pos + ng))).mean()

    return (direction(a, b) + direction(b, a)) / 2


def mixing_dense(a, b, scale, valid, options, seed):
    """Full logits [keys, synthetic] per row, synthetic from mix_hard_negatives with the seed."""
    g = torch.Generator().manual_seed(seed)
    n = a.shape[0]
    targets = torch.arange(n)

    def direction(q, k):
        syn = mix_hard_negatives(q.detach(), k.detach(), targets, valid, generator=g, **options).double()
        q, k = q.double(), k.double()
        keys = scale * q @ k.T
        keys = keys.masked_fill(~valid[None, :], -math.inf)
        logits = torch.cat([keys, scale * torch.einsum("nd,nsd->ns", q, syn)], 1)
        return F.cross_entropy(logits[valid], targets[valid], reduction="mean")

    return (direction(a, b) + direction(b, a)) / 2


TERMS = {
    "negclip": (
        lambda x, s, seed: negclip(x[0], x[1], x[2], s, valid=x[3], negatives_valid=x[4], tile=4),
        lambda x, s, seed: negclip_dense(x[0], x[1], x[2], s, x[3], x[4]),
    ),
    "hard_negative_nce": (
        lambda x, s, seed: hard_negative_nce(x[0], x[1], s, beta=0.7, tau_plus=0.1, valid=x[3], tile=3),
        lambda x, s, seed: hcl_dense(x[0], x[1], s, 0.7, 0.1, x[3]),
    ),
    "hard_negative_nce_no_debias": (
        lambda x, s, seed: hard_negative_nce(x[0], x[1], s, beta=2.0, tau_plus=0.0, valid=x[3]),
        lambda x, s, seed: hcl_dense(x[0], x[1], s, 2.0, 0.0, x[3]),
    ),
    "hard_negative_mixing": (
        lambda x, s, seed: hard_negative_mixing(
            x[0],
            x[1],
            s,
            n_hard=4,
            n_mix=3,
            n_self=2,
            valid=x[3],
            tile=3,
            generator=torch.Generator().manual_seed(seed),
        ),
        lambda x, s, seed: mixing_dense(x[0], x[1], s, x[3], {"n_hard": 4, "n_mix": 3, "n_self": 2}, seed),
    ),
}


def _assert_grad_close(got, want):
    """float32 against the float64 reference: relative error of the whole gradient."""
    rel = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)
    assert rel < 2e-5, rel.item()


def _value_and_grads(fn, inputs, scale):
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    s = torch.tensor(scale, requires_grad=True)
    loss = fn([*leaves, *inputs[3:]], s, 11)
    loss.backward()
    return loss.detach().double(), [t.grad for t in leaves] + [s.grad]


@pytest.mark.parametrize("name", list(TERMS))
@pytest.mark.parametrize("scale", [5.0, 30.0])
def test_term_equals_dense_reference(name, scale):
    ours_fn, ref_fn = TERMS[name]
    inputs = _inputs()
    ours, ours_grads = _value_and_grads(ours_fn, inputs, scale)
    ref, ref_grads = _value_and_grads(ref_fn, inputs, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
            continue
        _assert_grad_close(got, want)


def test_hcl_reduces_to_info_nce_and_weights_hard_negatives():
    from mmcontrast.losses import info_nce

    image, text, _, valid, _ = _inputs(n=12)
    plain = info_nce(image, text, torch.tensor(10.0), valid=valid)
    torch.testing.assert_close(
        hard_negative_nce(image, text, torch.tensor(10.0), beta=0.0, valid=valid), plain
    )
    assert hard_negative_nce(image, text, torch.tensor(10.0), beta=1.0, valid=valid) > plain


def test_mixing_uses_the_hardest_negatives():
    g = torch.Generator().manual_seed(3)
    q, keys = _unit(g, 6, 8), _unit(g, 20, 8)
    targets = torch.tensor([0, 3, 5, 7, 9, 11])
    col_valid = torch.ones(20, dtype=torch.bool)
    col_valid[2] = False
    syn = mix_hard_negatives(q, keys, targets, col_valid, n_hard=1, n_mix=1, n_self=0, tile=3)
    scores = (q @ keys.T).masked_fill(~col_valid[None], -math.inf)
    scores[torch.arange(6), targets] = -math.inf
    hardest = keys[scores.argmax(1)]
    torch.testing.assert_close(syn[:, 0], hardest)  # a mix of the hardest with itself is itself


def test_negatives_of_invalid_samples_and_invalid_negatives_are_ignored():
    image, text, negatives, valid, negatives_valid = _inputs()
    base = negclip(image, text, negatives, torch.tensor(10.0), valid=valid, negatives_valid=negatives_valid)
    noisy = negatives.clone()
    noisy[~valid] = _unit(torch.Generator().manual_seed(9), int((~valid).sum()), 3, 16)
    noisy[~negatives_valid] = 0.5
    again = negclip(image, text, noisy, torch.tensor(10.0), valid=valid, negatives_valid=negatives_valid)
    torch.testing.assert_close(base, again)


def _ranks_fn(rank, world, name, sizes):
    inputs = _inputs(n=sum(sizes))
    start = sum(sizes[:rank])
    local = [t[start : start + sizes[rank]] for t in inputs]
    ours_fn, _ = TERMS[name]
    value, grads = _value_and_grads(ours_fn, local, 8.0)
    return value, grads


@pytest.mark.parametrize("name", list(TERMS))
def test_two_gloo_ranks_equal_dense_reference(name):
    sizes = (4, 6)
    ranks = run_ranks(2, _ranks_fn, name, sizes)
    _, ref_fn = TERMS[name]
    ref, ref_grads = _value_and_grads(ref_fn, _inputs(n=sum(sizes)), 8.0)
    assert abs(float(sum(r[0] for r in ranks)) / 2 - float(ref)) < 1e-5
    for i in range(3):  # each rank holds the gradient of its own rows, averaged over ranks
        if ref_grads[i] is None:  # an input the term does not use (negative captions for HCL)
            continue
        _assert_grad_close(torch.cat([r[1][i] for r in ranks]) / 2, ref_grads[i])
    _assert_grad_close(sum(r[1][3] for r in ranks) / 2, ref_grads[3])
