"""Symmetric InfoNCE (CLIP loss): local query rows against every rank's key columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcontrast.losses.gather import gather_rows, world_info


def _row_cross_entropy(logits, targets, col_valid, label_smoothing):
    """Per-row CE over valid columns; smoothing spreads epsilon over valid columns only."""
    logits = logits.masked_fill(~col_valid[None, :], float("-inf"))
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    uniform = -(log_probs.masked_fill(~col_valid[None, :], 0.0)).sum(1) / col_valid.sum()
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of `a` and `b`.

    a, b: (n, d) this rank's L2-normalised embeddings, row i of a paired with row i of b.
    logit_scale: scalar, already exp()-ed. valid: (n,) bool, False where a sample lacks a or b
    (its row and its column are left out). Returns a scalar: this rank's share of the global mean
    loss, scaled by world size so that averaging over ranks (data-parallel gradient averaging)
    gives the mean over all valid samples of every rank. Without torch.distributed it is the
    plain mean, as open_clip's ClipLoss.
    """
    n = a.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=a.device) if valid is None else valid.bool()
    _, world = world_info()
    a_all, offset = gather_rows(a)
    b_all, _ = gather_rows(b)
    valid_all, _ = gather_rows(valid)
    total_valid = valid_all.sum()
    if total_valid == 0:
        return (a.sum() + b.sum()) * 0.0
    rows = valid.nonzero().squeeze(1)
    targets = rows + offset
    scale = logit_scale.float()
    a_rows, b_rows = a[rows].float(), b[rows].float()
    loss_ab = _row_cross_entropy(scale * a_rows @ b_all.float().T, targets, valid_all, label_smoothing)
    loss_ba = _row_cross_entropy(scale * b_rows @ a_all.float().T, targets, valid_all, label_smoothing)
    return (loss_ab.sum() + loss_ba.sum()) * (world / (2.0 * total_valid))
