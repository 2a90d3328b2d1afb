"""GRAM volume and loss against brute-force determinants, in one process and on 2 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F

from mmcontrast.config import LossConfig, TermConfig
from mmcontrast.losses import Objective, gram_loss, gram_volume
from tests.distributed import run_ranks


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _brute_volume(anchor, *others):
    """sqrt(det(G)) one tuple at a time with torch.linalg.det, as the GRAM reference does."""
    out = torch.empty(anchor.shape[0], others[0].shape[0], dtype=torch.float64)
    for i in range(anchor.shape[0]):
        for j in range(others[0].shape[0]):
            m = torch.stack([anchor[i], *(o[j] for o in others)]).double()
            out[i, j] = torch.linalg.det(m @ m.T).clamp(min=1e-8).sqrt()
    return out.float()


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_volume_equals_brute_force_determinant(k):
    anchor = _unit(6, 16, seed=k)
    others = [_unit(9, 16, seed=10 * k + m) for m in range(k - 1)]
    torch.testing.assert_close(
        gram_volume(anchor, *others), _brute_volume(anchor, *others), atol=1e-5, rtol=1e-5
    )


def test_volume_is_zero_for_identical_and_one_for_orthogonal_vectors():
    e = torch.eye(4)
    assert gram_volume(e[:1], e[:1], e[1:2]).item() == pytest.approx(1e-4, abs=1e-4)  # clamp: sqrt(1e-8)
    assert gram_volume(e[:1], e[1:2], e[2:3]).item() == pytest.approx(1.0, abs=1e-6)


def _dense_gram_loss(anchor, others, tau, valid, eps):
    a, os_ = anchor[valid], [o[valid] for o in others]
    b1, b2 = a.shape[0], os_[0].shape[0]
    rows = torch.stack(
        [a[:, None, :].expand(b1, b2, -1), *(o[None, :, :].expand(b1, b2, -1) for o in os_)], dim=2
    )
    det = torch.linalg.det(rows @ rows.transpose(-1, -2))  # the reference's (B, B, k, k) determinant
    logits = -det.clamp(min=1e-8).sqrt() / tau
    y = torch.arange(b1)
    return 0.5 * (
        F.cross_entropy(logits, y, label_smoothing=eps) + F.cross_entropy(logits.T, y, label_smoothing=eps)
    )


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("n,k,tile", [(1, 3, None), (7, 3, 3), (40, 3, 9), (33, 2, 5), (20, 4, 6)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_equals_dense_determinant_reference(n, k, tile, eps, masked):
    xs = [_unit(n, 24, seed=100 * k + m) for m in range(k)]
    valid = torch.ones(n, dtype=torch.bool)
    if masked and n > 3:
        valid[[0, n // 2]] = False
    tau = torch.tensor(0.1)
    ours, g_ours = _grads(
        lambda t, *x: gram_loss(x[0], x[1:], t, label_smoothing=eps, valid=valid, tile=tile), [tau, *xs]
    )
    ref, g_ref = _grads(lambda t, *x: _dense_gram_loss(x[0], x[1:], t, valid, eps), [tau, *xs])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for u, v in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5 * max(1.0, v.abs().max().item()))


def test_collinear_inputs_keep_finite_gradients():
    a = _unit(5, 8, seed=1)
    leaves = [a.clone().requires_grad_(), a.clone().requires_grad_(), a.clone().requires_grad_()]
    tau = torch.tensor(0.07, requires_grad=True)
    loss = gram_loss(leaves[0], leaves[1:], tau)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in [*leaves, tau])


def _rank_gram(rank, world, sizes):
    xs = [_unit(sum(sizes), 16, seed=m) for m in range(3)]
    valid = torch.ones(sum(sizes), dtype=torch.bool)
    valid[[2, 9]] = False
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    leaves = [x[lo:hi].clone().requires_grad_() for x in xs]
    tau = torch.tensor(0.2, requires_grad=True)
    loss = gram_loss(leaves[0], leaves[1:], tau, valid=valid[lo:hi], tile=4)
    loss.backward()
    return loss.item(), [t.grad for t in leaves], tau.grad


@pytest.mark.parametrize("sizes", [(6, 6), (4, 9)])
def test_two_gloo_ranks_equal_one_process(sizes):
    single_loss, single_grads, single_tau = _rank_gram(0, 1, (sum(sizes),))
    ranks = run_ranks(2, _rank_gram, sizes)
    assert sum(r[0] for r in ranks) / 2 == pytest.approx(single_loss, rel=1e-5)
    for m in range(3):
        torch.testing.assert_close(
            torch.cat([r[1][m] for r in ranks]) / 2, single_grads[m], atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(sum(r[2] for r in ranks) / 2, single_tau, atol=1e-5, rtol=1e-4)


def test_gram_term_masks_samples_missing_a_modality():
    emb = {m: _unit(8, 16, seed=i) for i, m in enumerate(("image", "text", "audio"))}
    present = {m: torch.ones(8, dtype=torch.bool) for m in emb}
    present["audio"][3] = False
    cfg = LossConfig(terms=[TermConfig(name="gram", pairs="all", options={"anchor": "text"})])
    total, parts = Objective.from_config(cfg, ["image", "text", "audio"])(emb, present, torch.tensor(10.0))
    valid = torch.ones(8, dtype=torch.bool)
    valid[3] = False
    expected = gram_loss(emb["text"], [emb["image"], emb["audio"]], torch.tensor(0.1), valid=valid)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"gram/text-image+audio"}
