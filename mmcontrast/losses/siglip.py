"""SigLIP (sigmoid pairwise loss), tiled over key columns with recomputation in backward.

With logits l_ij = scale * a_i.b_j + bias and z_ij = +1 on positives, -1 elsewhere:
    sum_j softplus(-z_ij l_ij) = sum_j softplus(l_ij) - l_{i,t_i}
since softplus(x) - softplus(-x) = x, so the positive needs no tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcontrast.losses.gather import gather_rows, global_valid, sum_valid, valid_summary, world_info
from mmcontrast.losses.tiled import default_tile


class _TiledSigmoid(torch.autograd.Function):
    """(q (n,d), k (N,d), scale (), bias ()) -> per-row loss (n,)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, targets, col_valid, tile):
        qf, kf, sc, bi = q.float(), k.float(), scale.float(), bias.float()
        loss = qf.new_zeros(qf.shape[0])
        for start in range(0, kf.shape[0], tile):
            stop = min(start + tile, kf.shape[0])
            logits = sc * (qf @ kf[start:stop].T) + bi
            loss += F.softplus(logits).masked_fill(~col_valid[None, start:stop], 0.0).sum(1)
        loss -= sc * (qf * kf[targets]).sum(1) + bi
        ctx.save_for_backward(q, k, scale, bias, targets, col_valid)
        ctx.tile = tile
        return loss

    @staticmethod
    def backward(ctx, g):
        q, k, scale, bias, targets, col_valid = ctx.saved_tensors
        qf, kf, sc, bi, g = q.float(), k.float(), scale.float(), bias.float(), g.float()
        dq, dk = torch.zeros_like(qf), torch.zeros_like(kf)
        dscale, dbias = qf.new_zeros(()), qf.new_zeros(())
        for start in range(0, kf.shape[0], ctx.tile):
            stop = min(start + ctx.tile, kf.shape[0])
            k_tile = kf[start:stop]
            dots = qf @ k_tile.T
            grad = g[:, None] * torch.sigmoid(sc * dots + bi).masked_fill(~col_valid[None, start:stop], 0.0)
            dq += grad @ k_tile
            dk[start:stop] = grad.T @ qf
            dscale += (grad * dots).sum()
            dbias += grad.sum()
        dq, dk = dq * sc, dk * sc
        k_t = kf[targets]
        dq -= sc * g[:, None] * k_t
        dk.index_add_(0, targets, -sc * g[:, None] * qf)
        dscale -= (g * (qf * k_t).sum(1)).sum()
        dbias -= g.sum()
        return dq.to(q.dtype), dk.to(k.dtype), dscale.to(scale.dtype), dbias.to(bias.dtype), None, None, None


def siglip(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Sigmoid loss of local rows of `a` against every rank's rows of `b`.

    a, b: (n, d) L2-normalised, row i of a paired with row i of b; logit_scale: () already
    exp()-ed; logit_bias: (); valid: (n,) bool. Returns a scalar: the sum over all (row, column)
    pairs divided by the number of valid rows of the global batch (open_clip's SigLipLoss divides
    by the batch size), scaled by world size for data-parallel gradient averaging.
    """
    n = a.shape[0]
    valid, valid_all, total_valid = global_valid(valid, n, a.device)
    _, world = world_info()
    b_all, offset = gather_rows(b)
    some, every = valid_summary(valid_all, total_valid)  # the call's one host read
    if not some:
        return (a.sum() + b.sum()) * 0.0
    targets = torch.arange(n, device=a.device) + offset
    rows = _TiledSigmoid.apply(a, b_all, logit_scale, logit_bias, targets, valid_all, tile or default_tile(n))
    return sum_valid(rows, valid, every) * (world / total_valid)
