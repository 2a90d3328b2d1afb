"""The one tiled core: row-wise (and optionally column-wise) cross-entropy over key columns
produced tile by tile, never holding more than rows x tile scores.

Forward keeps a running log-sum-exp per row and saves only the inputs and the per-row (and
per-column) log-sum-exp; backward recomputes each tile (the idea of Inf-CL / FlashAttention).
Scores accumulate in float32 whatever the input dtype (bf16 inputs are upcast per tile).

For query i with target column t_i over valid columns C (|C| = c), label smoothing eps:
    loss_i = lse_j(s_ij) - (1 - eps) s_{i,t_i} - eps * mean_{j in C} s_ij,   s_ij = scale * q_i.k_j
The smoothing mean is scale * q_i . mean(k_C), so it needs no tile. With `square=True` rows and
columns are the same samples (t_i = i) and the column-wise loss of every column is computed from
the same tiles, because each column tile holds all rows.
"""

from __future__ import annotations

import torch

# rows x tile scores per tile: 2^23 floats = 32 MiB per temporary
DEFAULT_TILE_ELEMENTS = 1 << 23


def default_tile(rows: int) -> int:
    return max(64, DEFAULT_TILE_ELEMENTS // max(rows, 1))


def _masked_scores(q, k_tile, scale, col_valid_tile, row_valid, masking):
    """Scores of a tile, and views of them with invalid columns / rows at -inf (copies only
    when something is masked: each is rows x tile floats). masking: (columns, rows) need it,
    decided once per call (`_needs_masking`), not read from the device at every tile."""
    s = scale * (q @ k_tile.T)
    row_side = s.masked_fill(~col_valid_tile[None, :], float("-inf")) if masking[0] else s
    col_side = None
    if row_valid is not None:
        col_side = s.masked_fill(~row_valid[:, None], float("-inf")) if masking[1] else s
    return s, row_side, col_side


def _needs_masking(col_valid, row_valid) -> tuple[bool, bool]:
    """(some column invalid, some row invalid): the call's one host read of its masks."""
    flags = torch.stack([~col_valid.all(), ~row_valid.all()]).tolist()
    return bool(flags[0]), bool(flags[1])


def _take_targets(target_scores, s, targets, start, stop):
    """target_scores with s[i, targets[i] - start] where row i's target lies in [start, stop):
    a gather, no host synchronisation."""
    inside = (targets >= start) & (targets < stop)
    picked = s.gather(1, (targets - start).clamp(0, stop - start - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, target_scores)


def _masked_mean(x, mask):
    """Mean of x's rows where mask holds, (d,); zeros when none does. No host synchronisation."""
    return (x * mask[:, None]).sum(0) / mask.sum().clamp(min=1)


class TiledCrossEntropy(torch.autograd.Function):
    """(q (n,d), k (N,d), scale ()) -> (row_loss (n,), col_loss (N,) or (0,))."""

    @staticmethod
    def forward(ctx, q, k, scale, targets, row_valid, col_valid, label_smoothing, tile, square, masking):
        in_dtype = q.dtype
        qf, kf, sc = q.float(), k.float(), scale.float()
        n, big_n = qf.shape[0], kf.shape[0]
        row_max = qf.new_full((n,), float("-inf"))
        row_sum = qf.new_zeros(n)
        col_lse = qf.new_empty(big_n if square else 0)
        target_scores = qf.new_zeros(n)
        masking = masking if masking is not None else _needs_masking(col_valid, row_valid)
        ctx.masking = masking  # the backward reuses it: no second read
        for start in range(0, big_n, tile):
            stop = min(start + tile, big_n)
            s, row_side, col_side = _masked_scores(
                qf, kf[start:stop], sc, col_valid[start:stop], row_valid if square else None, masking
            )
            # the positive's score from the same tile, so lse - target rounds like a dense CE
            target_scores = _take_targets(target_scores, s, targets, start, stop)
            tile_max = row_side.max(dim=1).values
            new_max = torch.maximum(row_max, tile_max)
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            shifted = row_side - safe[:, None]
            row_sum = row_sum * torch.exp(row_max - safe) + shifted.exp_().sum(1)
            row_max = new_max
            if square:  # every row is in this tile: the columns' log-sum-exp is complete
                col_lse[start:stop] = torch.logsumexp(col_side, dim=0)
        row_lse = torch.log(row_sum) + row_max

        eps = label_smoothing
        k_mean = _masked_mean(kf, col_valid)
        row_loss = row_lse - (1 - eps) * target_scores - eps * sc * (qf @ k_mean)
        col_loss = qf.new_zeros(0)
        if square:
            q_mean = _masked_mean(qf, row_valid)
            col_loss = col_lse - (1 - eps) * target_scores - eps * sc * (kf @ q_mean)
        ctx.save_for_backward(q, k, scale, targets, row_valid, col_valid, row_lse, col_lse)
        ctx.eps, ctx.tile, ctx.square, ctx.in_dtype = eps, tile, square, in_dtype
        return row_loss, col_loss

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, scale, targets, row_valid, col_valid, row_lse, col_lse = ctx.saved_tensors
        eps, tile, square = ctx.eps, ctx.tile, ctx.square
        qf, kf, sc = q.float(), k.float(), scale.float()
        g_row = g_row.float()
        g_col = g_col.float() if square and g_col is not None else qf.new_zeros(kf.shape[0] if square else 0)
        dq, dk = torch.zeros_like(qf), torch.zeros_like(kf)
        dscale = qf.new_zeros(())
        masking = ctx.masking
        for start in range(0, kf.shape[0], tile):
            stop = min(start + tile, kf.shape[0])
            k_tile = kf[start:stop]
            s, row_side, col_side = _masked_scores(
                qf, k_tile, sc, col_valid[start:stop], row_valid if square else None, masking
            )
            # d loss / d score of the tile, built in place: the tile is the memory that matters
            grad = (row_side - row_lse[:, None]).exp_().mul_(g_row[:, None])
            if square:
                col_part = (col_side - col_lse[None, start:stop]).exp_().mul_(g_col[None, start:stop])
                grad.add_(col_part)
                del col_part
            dq.addmm_(grad, k_tile)
            torch.mm(grad.T, qf, out=dk[start:stop])
            dscale += torch.dot(grad.reshape(-1), s.reshape(-1))
        dq, dk, dscale = dq * sc, dk * sc, dscale / sc

        # target and smoothing terms are linear in the scores: closed forms, no tiles
        k_t = kf[targets]
        w = (1 - eps) * g_row
        dq -= sc * w[:, None] * k_t
        dk.index_add_(0, targets, -sc * w[:, None] * qf)
        dscale -= (w * (qf * k_t).sum(1)).sum()
        k_mean = _masked_mean(kf, col_valid)
        dq -= sc * eps * g_row[:, None] * k_mean[None, :]
        g_q = (g_row[:, None] * qf).sum(0)
        dk -= col_valid[:, None] * (sc * eps * g_q / col_valid.sum().clamp(min=1))[None, :]
        dscale -= eps * (g_q @ k_mean)
        if square:
            wc = (1 - eps) * g_col
            dq -= sc * wc[:, None] * kf
            dk -= sc * wc[:, None] * qf
            dscale -= (wc * (qf * kf).sum(1)).sum()
            q_mean = _masked_mean(qf, row_valid)
            dk -= sc * eps * g_col[:, None] * q_mean[None, :]
            g_k = (g_col[:, None] * kf).sum(0)
            dq -= row_valid[:, None] * (sc * eps * g_k / row_valid.sum().clamp(min=1))[None, :]
            dscale -= eps * (g_k @ q_mean)
        dtype = ctx.in_dtype
        return dq.to(dtype), dk.to(k.dtype), dscale.to(scale.dtype), None, None, None, None, None, None, None


def tiled_cross_entropy(
    q,
    k,
    scale,
    targets,
    *,
    row_valid=None,
    col_valid=None,
    label_smoothing=0.0,
    tile=None,
    square=False,
    masking=None,
):
    """Per-row (and with square=True per-column) cross-entropy losses, tiled over columns.

    q: (n, d) query rows; k: (N, d) key columns (may be gathered from all ranks, with gradients);
    scale: () multiplier of the dot products; targets: (n,) column index of each row's positive;
    row_valid: (n,), col_valid: (N,) bool masks (invalid columns are no negatives; invalid rows'
    losses are meaningless and must be dropped by the caller). square=True requires n == N and
    targets == arange(n). masking: (some column invalid, some row invalid) when the caller knows
    it (no host read here then); None reads it from the masks once per call.
    Returns (row_loss (n,), col_loss (N,) or (0,)).
    """
    n, big_n = q.shape[0], k.shape[0]
    row_valid = torch.ones(n, dtype=torch.bool, device=q.device) if row_valid is None else row_valid
    col_valid = torch.ones(big_n, dtype=torch.bool, device=q.device) if col_valid is None else col_valid
    tile = tile or default_tile(n)
    return TiledCrossEntropy.apply(
        q, k, scale, targets, row_valid, col_valid, float(label_smoothing), int(tile), bool(square), masking
    )


class TiledScoreCrossEntropy(torch.autograd.Function):
    """The core for scores that are not one dot product (GRAM volumes, Symile's generated
    columns): score_fn(rows, cols, start, stop) -> (n, stop - start) scores of a column tile.

    Forward runs score_fn without autograd; backward recomputes each tile under autograd and
    pushes d loss / d scores through it, so memory stays at one tile's graph.
    """

    @staticmethod
    def forward(
        ctx, score_fn, n_rows_inputs, targets, row_valid, col_valid, eps, tile, square, masking, *inputs
    ):
        rows, cols = inputs[:n_rows_inputs], inputs[n_rows_inputs:]
        n, n_cols = targets.shape[0], col_valid.shape[0]
        device = targets.device
        row_max = torch.full((n,), float("-inf"), device=device)
        row_sum = torch.zeros(n, device=device)
        row_mean = torch.zeros(n, device=device)  # sum over valid columns of s_ij, for smoothing
        target_scores = torch.zeros(n, device=device)
        col_lse = torch.zeros(n_cols if square else 0, device=device)
        col_mean = torch.zeros(n_cols if square else 0, device=device)
        # read once (unless the caller knows); the backward reuses it
        ctx.masking = masking if masking is not None else _needs_masking(col_valid, row_valid)
        cols_masked = ctx.masking[0]
        for start in range(0, n_cols, tile):
            stop = min(start + tile, n_cols)
            s = score_fn(rows, cols, start, stop).float()
            cv = col_valid[start:stop]
            row_side = s.masked_fill(~cv[None, :], float("-inf")) if cols_masked else s
            new_max = torch.maximum(row_max, row_side.max(dim=1).values)
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            row_sum = row_sum * torch.exp(row_max - safe) + (row_side - safe[:, None]).exp_().sum(1)
            row_max = new_max
            if eps:
                row_mean += (s.masked_fill(~cv[None, :], 0.0) if cols_masked else s).sum(1)
            target_scores = _take_targets(target_scores, s, targets, start, stop)
            if square:
                col_side = s.masked_fill(~row_valid[:, None], float("-inf"))
                col_lse[start:stop] = torch.logsumexp(col_side, dim=0)
                if eps:
                    col_mean[start:stop] = s.masked_fill(~row_valid[:, None], 0.0).sum(0)
        row_lse = torch.log(row_sum) + row_max
        row_loss = row_lse - (1 - eps) * target_scores - eps * row_mean / col_valid.sum()
        col_loss = torch.zeros(0, device=device)
        if square:  # targets == arange: the positive of column j is s_jj
            col_loss = col_lse - (1 - eps) * target_scores - eps * col_mean / row_valid.sum()
        ctx.save_for_backward(targets, row_valid, col_valid, row_lse, col_lse, *inputs)
        ctx.score_fn, ctx.n_rows_inputs, ctx.eps, ctx.tile, ctx.square = (
            score_fn,
            n_rows_inputs,
            eps,
            tile,
            square,
        )
        return row_loss, col_loss

    @staticmethod
    def backward(ctx, g_row, g_col):
        targets, row_valid, col_valid, row_lse, col_lse, *inputs = ctx.saved_tensors
        eps, square = ctx.eps, ctx.square
        n_cols = col_valid.shape[0]
        g_row = g_row.float()
        g_col = g_col.float() if square and g_col is not None else None
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        rows, cols = tuple(leaves[: ctx.n_rows_inputs]), tuple(leaves[ctx.n_rows_inputs :])
        wanted = [x for x in leaves if x.requires_grad]
        grads = [torch.zeros_like(x) for x in wanted]
        n_valid_cols, n_valid_rows = col_valid.sum(), row_valid.sum()
        cols_masked, rows_masked = ctx.masking
        for start in range(0, n_cols, ctx.tile):
            stop = min(start + ctx.tile, n_cols)
            cv = col_valid[start:stop]
            with torch.enable_grad():
                s = ctx.score_fn(rows, cols, start, stop).float()
            with torch.no_grad():
                # d loss_i / d s_ij = g_i (p_ij - (1 - eps) [j = t_i] - eps / C), valid j only
                sd = s.detach()
                grad = (sd - row_lse[:, None]).exp_()
                if cols_masked:
                    grad.masked_fill_(~cv[None, :], 0.0)
                if eps:
                    grad.sub_(eps / n_valid_cols * cv[None, :])
                grad.mul_(g_row[:, None])
                # the positive's term, scattered where the target lies in this tile (no host read)
                inside = (targets >= start) & (targets < stop)
                column = (targets - start).clamp(0, stop - start - 1)[:, None]
                grad.scatter_add_(1, column, (-(1 - eps) * g_row * inside)[:, None])
                if square:
                    col_part = (sd - col_lse[None, start:stop]).exp_()
                    if rows_masked:
                        col_part.masked_fill_(~row_valid[:, None], 0.0)
                    if eps:
                        col_part.sub_(eps / n_valid_rows * row_valid[:, None])
                    col_part.mul_(g_col[None, start:stop])
                    idx = torch.arange(start, stop, device=sd.device)
                    col_part[idx, idx - start] -= (1 - eps) * g_col[start:stop]
                    grad.add_(col_part)
            if wanted:
                for acc, part in zip(
                    grads, torch.autograd.grad(s, wanted, grad, allow_unused=True), strict=True
                ):
                    if part is not None:
                        acc += part
        it = iter(grads)
        input_grads = [next(it).to(x.dtype) if x.requires_grad else None for x in leaves]
        return (None, None, None, None, None, None, None, None, None, *input_grads)


def tiled_score_cross_entropy(
    score_fn,
    rows: tuple,
    cols: tuple,
    n_cols: int,
    targets,
    *,
    row_valid=None,
    col_valid=None,
    label_smoothing=0.0,
    tile=None,
    square=False,
    masking=None,
):
    """Per-row (and with square=True per-column) cross-entropy over n_cols generated columns.

    score_fn(rows, cols, start, stop) -> (n, stop - start) scores of columns [start, stop),
    differentiable in the `rows` and `cols` tensors; targets: (n,) positive column per row;
    row_valid (n,), col_valid (n_cols,) bool. square=True: rows and columns are the same n
    samples with targets == arange(n). masking: (some column invalid, some row invalid) when the
    caller knows; without masks nothing is masked. Otherwise the core reads the masks once.
    Returns (row_loss (n,), col_loss (n_cols,) or (0,)).
    """
    n = targets.shape[0]
    device = targets.device
    if masking is None and row_valid is None and col_valid is None:
        masking = (False, False)  # the all-valid masks made below: nothing to read
    row_valid = torch.ones(n, dtype=torch.bool, device=device) if row_valid is None else row_valid
    col_valid = torch.ones(n_cols, dtype=torch.bool, device=device) if col_valid is None else col_valid
    tile = tile or default_tile(n)
    return TiledScoreCrossEntropy.apply(
        score_fn,
        len(rows),
        targets,
        row_valid,
        col_valid,
        float(label_smoothing),
        int(tile),
        bool(square),
        masking,
        *rows,
        *cols,
    )
