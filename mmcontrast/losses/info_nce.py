"""Symmetric InfoNCE (CLIP loss) through the tiled core: O(rows x tile) score memory."""

from __future__ import annotations

import torch

from mmcontrast.losses.gather import gather_rows, global_valid, sum_valid, valid_summary, world_info
from mmcontrast.losses.tiled import tiled_cross_entropy


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    tile: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of `a` and `b`.

    a, b: (n, d) this rank's L2-normalised embeddings (float32 or bf16), row i of a paired with
    row i of b. logit_scale: (), already exp()-ed. valid: (n,) bool, False where a sample lacks a
    or b: its row and its column are left out. tile: key columns per tile (default: about 2^23
    scores per tile). Returns a scalar: this rank's share of the mean loss over all valid samples
    of every rank, scaled by world size so that averaging over ranks (data-parallel gradient
    averaging) gives the global mean. In one process it is open_clip's ClipLoss.
    """
    n = a.shape[0]
    valid, valid_all, total_valid = global_valid(valid, n, a.device)
    some, every = valid_summary(valid_all, total_valid)  # the call's one host read
    if not some:
        return (a.sum() + b.sum()) * 0.0
    _, world = world_info()
    opts = {"label_smoothing": label_smoothing, "tile": tile, "masking": (not every, not every)}
    if world == 1:
        # one pass over the tiles gives both directions: each column tile holds every row
        targets = torch.arange(n, device=a.device)
        rows, cols = tiled_cross_entropy(
            a, b, logit_scale, targets, row_valid=valid, col_valid=valid, square=True, **opts
        )
        return (sum_valid(rows, valid, every) + sum_valid(cols, valid, every)) / (2.0 * total_valid)

    a_all, offset = gather_rows(a)
    b_all, _ = gather_rows(b)
    targets = torch.arange(n, device=a.device) + offset
    ab, _ = tiled_cross_entropy(a, b_all, logit_scale, targets, row_valid=valid, col_valid=valid_all, **opts)
    ba, _ = tiled_cross_entropy(b, a_all, logit_scale, targets, row_valid=valid, col_valid=valid_all, **opts)
    return (sum_valid(ab, valid, every) + sum_valid(ba, valid, every)) * (world / (2.0 * total_valid))
