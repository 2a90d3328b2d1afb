"""GRAM: similarity of a tuple of embeddings = volume of the parallelotope they span.

Vol = sqrt(det G), G the k x k Gram matrix of (anchor_i, other_1_j, ..., other_{k-1}_j). For
k = 2 and 3 det G has a closed form in dot products, so a (B1, B2) volume tile costs k - 1 matrix
products and a few vectors instead of B1 * B2 determinants. det is clamped before the square root
so collinear inputs (Vol = 0) keep a finite gradient.
"""

from __future__ import annotations

import torch

from mmcontrast.losses.gather import gather_rows, global_valid, sum_valid, valid_summary, world_info
from mmcontrast.losses.tiled import tiled_score_cross_entropy

MIN_DET = 1e-8
DEFAULT_GRAM_TILE = 128


def _gram_det(anchor, others, swap=False):
    """det G for anchor rows x tuple columns: (B1, B2). swap=True: `anchor` holds the columns."""
    sq = (anchor * anchor).sum(1)
    cross = [anchor @ o.T for o in others]  # (B1, B2) each
    if swap:
        cross = [c.T for c in cross]
        sq_a = sq[None, :]
    else:
        sq_a = sq[:, None]
    k = len(others) + 1
    if k == 2:
        (o,) = others
        sq_o = (o * o).sum(1)
        return sq_a * (sq_o[:, None] if swap else sq_o[None, :]) - cross[0] ** 2
    if k == 3:
        v, w = others
        vv, ww, vw = (v * v).sum(1), (w * w).sum(1), (v * w).sum(1)
        if swap:  # tuple index is the row
            vv, ww, vw = vv[:, None], ww[:, None], vw[:, None]
        else:
            vv, ww, vw = vv[None, :], ww[None, :], vw[None, :]
        x, y = cross
        return sq_a * vv * ww + 2 * x * y * vw - sq_a * vw**2 - vv * y**2 - ww * x**2
    # k > 3: assemble the (B1, B2, k, k) Gram matrices of this tile and take determinants
    inner = torch.stack([torch.stack([(p * q).sum(1) for q in others]) for p in others])  # (k-1, k-1, B2)
    b1, b2 = cross[0].shape
    gram = anchor.new_empty(b1, b2, k, k)
    gram[..., 0, 0] = sq_a.expand(b1, b2)
    for m, c in enumerate(cross, start=1):
        gram[..., 0, m] = c
        gram[..., m, 0] = c
    tuple_axis = (slice(None), None) if swap else (None, slice(None))
    for m in range(k - 1):
        for n in range(k - 1):
            gram[..., m + 1, n + 1] = inner[m, n][tuple_axis].expand(b1, b2)
    return torch.linalg.det(gram)


def gram_volume(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Volumes spanned by (anchor_i, others[0]_j, ..., others[-1]_j): (B1, d), (B2, d)... -> (B1, B2)."""
    if not others:
        raise ValueError("gram_volume needs the anchor and at least one other modality")
    return _gram_det(anchor.float(), [o.float() for o in others]).clamp(min=MIN_DET).sqrt()


def _volume_logits(rows, cols, start, stop, swap):
    """-Vol * scale for a column tile. rows = (anchor, scale) and cols = others, or swapped."""
    if swap:  # rows are tuples, columns are anchors
        *others, scale = rows
        anchor = cols[0][start:stop]
        det = _gram_det(anchor.float(), [o.float() for o in others], swap=True)
    else:
        anchor, scale = rows
        det = _gram_det(anchor.float(), [o[start:stop].float() for o in cols])
    return -det.clamp(min=MIN_DET).sqrt() * scale


def gram_loss(
    anchor: torch.Tensor,
    others: list[torch.Tensor] | tuple[torch.Tensor, ...],
    temperature: torch.Tensor,
    *,
    label_smoothing: float = 0.1,
    valid: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """GRAM contrastive loss: logits = -Vol(anchor_i, tuple_j) / temperature, cross-entropy from
    anchors to tuples and from tuples to anchors, averaged.

    anchor: (n, d); others: k - 1 tensors (n, d) (row i of each belongs to sample i);
    temperature: () (learnable: pass 1 / logit_scale); valid: (n,) bool, False where a sample
    lacks any of the k modalities (its row and column are left out). Gathered from every rank with
    gradients; scaled like info_nce so data-parallel averaging gives the global mean.
    """
    others = list(others)
    n = anchor.shape[0]
    valid, valid_all, total = global_valid(valid, n, anchor.device)
    some, every = valid_summary(valid_all, total)
    if not some:
        return sum(x.sum() for x in [anchor, *others]) * 0.0
    scale = 1.0 / temperature
    # Small tiles: each tile's autograd graph holds ~10 (n x tile) tensors of the closed-form det.
    opts = {"label_smoothing": label_smoothing, "tile": tile or DEFAULT_GRAM_TILE}
    opts["masking"] = (not every, not every)  # decided by the one read above: the core reads nothing
    _, world = world_info()
    if world == 1:
        targets = torch.arange(n, device=anchor.device)
        rows, cols = tiled_score_cross_entropy(
            lambda r, c, a, b: _volume_logits(r, c, a, b, swap=False),
            (anchor, scale),
            tuple(others),
            n,
            targets,
            row_valid=valid,
            col_valid=valid,
            square=True,
            **opts,
        )
        return (sum_valid(rows, valid, every) + sum_valid(cols, valid, every)) / (2.0 * total)

    anchor_all, offset = gather_rows(anchor)
    others_all = [gather_rows(o)[0] for o in others]
    targets = torch.arange(n, device=anchor.device) + offset
    big_n = valid_all.shape[0]
    to_tuples, _ = tiled_score_cross_entropy(
        lambda r, c, a, b: _volume_logits(r, c, a, b, swap=False),
        (anchor, scale),
        tuple(others_all),
        big_n,
        targets,
        row_valid=valid,
        col_valid=valid_all,
        **opts,
    )
    to_anchors, _ = tiled_score_cross_entropy(
        lambda r, c, a, b: _volume_logits(r, c, a, b, swap=True),
        (*others, scale),
        (anchor_all,),
        big_n,
        targets,
        row_valid=valid,
        col_valid=valid_all,
        **opts,
    )
    return (sum_valid(to_tuples, valid, every) + sum_valid(to_anchors, valid, every)) * (
        world / (2.0 * total)
    )
