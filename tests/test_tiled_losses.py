"""Tiled InfoNCE and SigLIP against dense references, in one process and on 2 and 4 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmcontrast.losses import info_nce, siglip
from mmcontrast.losses.tiled import tiled_cross_entropy
from tests.distributed import run_ranks


def _inputs(n, d, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=1)
    valid = torch.ones(n, dtype=torch.bool)
    if masked and n > 2:
        valid[torch.randperm(n, generator=g)[: max(1, n // 5)]] = False
    return a, b, valid


def _dense_info_nce(a, b, scale, valid, eps):
    a, b = a[valid], b[valid]
    logits = scale * a @ b.T
    y = torch.arange(len(a))
    return 0.5 * (
        F.cross_entropy(logits, y, label_smoothing=eps) + F.cross_entropy(logits.T, y, label_smoothing=eps)
    )


def _dense_siglip(a, b, scale, bias, valid):
    return SigLipLoss()(a[valid], b[valid], scale, bias)


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _close(x, y):
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * max(1.0, y.abs().max().item()))


CASES = [(1, 16, None), (7, 32, 3), (64, 128, 10), (64, 512, 64), (1000, 64, 333), (1000, 512, 999)]


@pytest.mark.parametrize("n,d,tile", CASES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_info_nce_equals_dense(n, d, tile, eps, masked):
    a, b, valid = _inputs(n, d, seed=n + d, masked=masked)
    scale = torch.tensor(17.0)
    ours, g_ours = _grads(
        lambda x, y, s: info_nce(x, y, s, valid=valid, tile=tile, label_smoothing=eps), a, b, scale
    )
    ref, g_ref = _grads(lambda x, y, s: _dense_info_nce(x, y, s, valid, eps), a, b, scale)
    _close(ours, ref)
    for u, v in zip(g_ours, g_ref, strict=True):
        _close(u, v)


@pytest.mark.parametrize("n,d,tile", CASES[:4])
def test_info_nce_equals_open_clip_clip_loss(n, d, tile):
    a, b, _ = _inputs(n, d, seed=7)
    scale = torch.tensor(30.0)
    ours, g_ours = _grads(lambda x, y, s: info_nce(x, y, s, tile=tile), a, b, scale)
    ref, g_ref = _grads(lambda x, y, s: ClipLoss()(x, y, s), a, b, scale)
    _close(ours, ref)
    for u, v in zip(g_ours, g_ref, strict=True):
        _close(u, v)


@pytest.mark.parametrize("n,d,tile", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_siglip_equals_open_clip_siglip_loss(n, d, tile, masked):
    a, b, valid = _inputs(n, d, seed=3 * n + d, masked=masked)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours, g_ours = _grads(lambda x, y, s, c: siglip(x, y, s, c, valid=valid, tile=tile), a, b, scale, bias)
    ref, g_ref = _grads(lambda x, y, s, c: _dense_siglip(x, y, s, c, valid), a, b, scale, bias)
    _close(ours, ref)
    for u, v in zip(g_ours, g_ref, strict=True):
        _close(u, v)


def test_directional_core_equals_dense_cross_entropy():
    """The non-square path (queries vs a larger gathered key set), as ranks use it."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(9, 24, generator=g), torch.randn(31, 24, generator=g)
    targets = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11])
    col_valid = torch.ones(31, dtype=torch.bool)
    col_valid[[0, 20, 30]] = False
    scale = torch.tensor(2.5)

    def ours(q, k, s):
        rows, _ = tiled_cross_entropy(q, k, s, targets, col_valid=col_valid, tile=4, label_smoothing=0.2)
        return rows.sum()

    def dense(q, k, s):
        logits = (s * q @ k.T)[:, col_valid]
        remap = torch.cumsum(col_valid.long(), 0) - 1
        return F.cross_entropy(logits, remap[targets], label_smoothing=0.2, reduction="sum")

    lo, go = _grads(ours, q, k, scale)
    lr, gr = _grads(dense, q, k, scale)
    _close(lo, lr)
    for u, v in zip(go, gr, strict=True):
        _close(u, v)


def test_bf16_inputs_accumulate_in_float32():
    a, b, _ = _inputs(300, 64, seed=11)
    a16, b16 = a.bfloat16(), b.bfloat16()
    scale = torch.tensor(20.0)
    ours = info_nce(a16, b16, scale, tile=37)
    ref = ClipLoss()(a16.float(), b16.float(), scale)  # float32 math on the same bf16 values
    _close(ours, ref)
    a16.requires_grad_()
    info_nce(a16, b16, scale, tile=37).backward()
    assert a16.grad.dtype == torch.bfloat16


def test_no_valid_sample_is_zero_with_graph():
    a, b, _ = _inputs(5, 8)
    a.requires_grad_()
    for loss in (
        info_nce(a, b, torch.tensor(5.0), valid=torch.zeros(5, dtype=torch.bool)),
        siglip(a, b, torch.tensor(5.0), torch.tensor(0.0), valid=torch.zeros(5, dtype=torch.bool)),
    ):
        loss.backward()
        assert loss.item() == 0.0


# ---------------------------------------------------------------- distributed


def _rank_losses(rank, world, sizes, d, kind):
    total = sum(sizes)
    a, b, valid = _inputs(total, d, seed=99, masked=True)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    leaves = [
        a[lo:hi].clone().requires_grad_(),
        b[lo:hi].clone().requires_grad_(),
        torch.tensor(13.0, requires_grad=True),
        torch.tensor(-4.0, requires_grad=True),
    ]
    if kind == "info_nce":
        loss = info_nce(leaves[0], leaves[1], leaves[2], valid=valid[lo:hi], tile=5, label_smoothing=0.1)
    else:
        loss = siglip(leaves[0], leaves[1], leaves[2], leaves[3], valid=valid[lo:hi], tile=5)
    loss.backward()
    return loss.item(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


@pytest.mark.parametrize("world,sizes", [(2, (5, 11)), (4, (3, 9, 1, 6))])
@pytest.mark.parametrize("kind", ["info_nce", "siglip"])
def test_distributed_equals_one_process_on_concatenated_batch(world, sizes, kind):
    single_loss, single_grads = _rank_losses(0, 1, (sum(sizes),), 32, kind)
    ranks = run_ranks(world, _rank_losses, sizes, 32, kind)
    assert sum(r[0] for r in ranks) / world == pytest.approx(single_loss, rel=1e-5)
    # each rank's input gradient is world x its slice of the global gradient (averaged later)
    a_grad = torch.cat([r[1][0] for r in ranks]) / world
    b_grad = torch.cat([r[1][1] for r in ranks]) / world
    _close(a_grad, single_grads[0])
    _close(b_grad, single_grads[1])
    _close(sum(r[1][2] for r in ranks) / world, single_grads[2])
    _close(sum(r[1][3] for r in ranks) / world, single_grads[3])


@pytest.mark.parametrize("loss", ["mmcontrast info_nce", "mmcontrast siglip"])
def test_peak_memory_stays_far_below_one_dense_logits_matrix(repo_root, loss):
    """Measured in a fresh process by the benchmark's own worker (resident-set high-water mark)."""
    import json
    import subprocess
    import sys

    batch, dim = 8192, 64
    out = subprocess.run(
        [
            sys.executable,
            str(repo_root / "benchmarks/loss_memory.py"),
            "--worker",
            loss,
            str(batch),
            str(dim),
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    peak_mb = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    # One B x B float32 matrix is 256 MiB; open_clip's losses hold about four (~1 GiB). The tiled
    # loss must not hold even one: its tiles are 2^23 scores (32 MiB) each.
    dense_logits_mb = batch * batch * 4 / 2**20
    assert peak_mb < dense_logits_mb, f"{loss} peaked at {peak_mb:.0f} MiB"


@pytest.mark.parametrize("square", [True, False])
def test_tiles_make_no_host_read(monkeypatch, square):
    """Meta tensors have no values: any per-tile read of the device (a mask's bool(), nonzero(),
    boolean indexing) raises. The call's one read, whether to mask at all, is taken as 'yes'."""
    from mmcontrast.losses import tiled
    from mmcontrast.losses.tiled import tiled_score_cross_entropy

    monkeypatch.setattr(tiled, "_needs_masking", lambda col_valid, row_valid: (True, True))
    n, big_n = 12, 12 if square else 20
    q = torch.randn(n, 8, device="meta", requires_grad=True)
    k = torch.randn(big_n, 8, device="meta", requires_grad=True)
    scale = torch.ones((), device="meta", requires_grad=True)
    targets = torch.arange(n, device="meta")
    masks = {
        "row_valid": torch.ones(n, dtype=torch.bool, device="meta"),
        "col_valid": torch.ones(big_n, dtype=torch.bool, device="meta"),
    }
    rows, cols = tiled_cross_entropy(
        q, k, scale, targets, label_smoothing=0.1, tile=5, square=square, **masks
    )
    (rows.sum() + cols.sum()).backward()
    assert q.grad.device.type == "meta" and k.grad.shape == k.shape

    def scores(r, c, start, stop):
        return r[0] @ c[0][start:stop].T

    rows, cols = tiled_score_cross_entropy(
        scores, (q,), (k,), big_n, targets, label_smoothing=0.1, tile=5, square=square, **masks
    )
    (rows.sum() + cols.sum()).backward()


@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_a_pair_loss_makes_one_host_read_when_every_sample_is_valid(monkeypatch, loss):
    """Meta tensors have no values, so any read of the device raises: the loss's only read is
    valid_summary (once per call), and the tiled core reads nothing of its own, forward or
    backward, when the caller says whether to mask."""
    import importlib

    from mmcontrast.losses import tiled

    # the modules, not the functions the package exports under the same names
    info_nce_module = importlib.import_module("mmcontrast.losses.info_nce")
    siglip_module = importlib.import_module("mmcontrast.losses.siglip")

    reads = []

    def summary(valid_all, total):
        reads.append(valid_all.shape[0])
        return True, True

    def refuse(col_valid, row_valid):
        raise AssertionError("the tiled core read its masks")

    for module in (info_nce_module, siglip_module):
        monkeypatch.setattr(module, "valid_summary", summary)
    monkeypatch.setattr(tiled, "_needs_masking", refuse)
    n = 12
    a = torch.randn(n, 8, device="meta", requires_grad=True)
    b = torch.randn(n, 8, device="meta", requires_grad=True)
    scale = torch.ones((), device="meta", requires_grad=True)
    valid = torch.ones(n, dtype=torch.bool, device="meta")
    if loss == "info_nce":
        value = info_nce_module.info_nce(a, b, scale, valid=valid, tile=5, label_smoothing=0.1)
    else:
        value = siglip_module.siglip(a, b, scale, torch.zeros((), device="meta"), valid=valid, tile=5)
    value.backward()
    assert reads == [n] and a.grad.device.type == "meta" and b.grad.shape == b.shape
