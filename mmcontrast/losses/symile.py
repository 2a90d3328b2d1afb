"""Symile (Saporta et al., NeurIPS 2024): contrast M >= 2 modalities at once through the
multilinear inner product MIP(x, y, z, ...) = sum_k x_k y_k z_k ...

Each modality in turn is the anchor: its row i is scored against columns that are elementwise
products of the other modalities' embeddings, cross-entropy with the true tuple as positive,
averaged over anchors. MIP(x, y, z) = x . (y * z), so a column is one vector and a tile of scores
is one matrix product. Negatives:
  "n":         column j = product of the non-anchors, each row-shuffled by its own permutation,
               with the true tuple put back on the diagonal (B columns, as the `symile` package);
  "n_squared": every combination of the other modalities' rows, B^(M-1) columns. The package
               materialises them all; here a tile's product columns are built from mixed-radix
               indices and discarded, so memory stays at one tile (time is still n B^(M-1) d).
"""

from __future__ import annotations

import torch

from mmcontrast.losses.gather import gather_rows, world_info
from mmcontrast.losses.tiled import default_tile, tiled_score_cross_entropy

NEGATIVES = ("n", "n_squared")


def mip_scores(queries: list[torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """MIP(query_1[i], ..., query_k[i], candidates[j]): ((n, d), ...), (c, d) -> (n, c)."""
    prod = queries[0].float()
    for q in queries[1:]:
        prod = prod * q.float()
    return prod @ candidates.float().T


def _tuple_columns(cols, start, stop):
    """Products of columns [start, stop) of all V^K tuples; the last modality varies fastest."""
    n_base, last = cols[0].shape[0], cols[-1].float()
    if len(cols) == 1:
        return last[start:stop]
    if start % n_base == 0 and stop % n_base == 0:
        # whole runs of the last modality: a broadcast product, no gather (and no scatter in backward)
        lead = _tuple_columns(cols[:-1], start // n_base, stop // n_base)
        return (lead[:, None, :] * last[None, :, :]).reshape(-1, last.shape[1])
    idx = torch.arange(start, stop, device=last.device)
    prod = None
    for o in reversed(cols):
        term = o[idx % n_base].float()
        idx = idx // n_base
        prod = term if prod is None else term * prod
    return prod


def _whole_runs_tile(n_rows, n_base):
    """The default tile, cut to whole runs of the last modality when it holds at least one."""
    tile = default_tile(n_rows)
    return tile - tile % n_base if tile >= n_base else tile


def _all_tuples_scores(rows, cols, start, stop):
    anchor, scale = rows
    # scale the (n, d) rows, not the (n, tile) scores: one pass fewer over the tile
    return (scale * anchor.float()) @ _tuple_columns(cols, start, stop).T


def _shuffled_scores(rows, cols, start, stop, targets):
    """Scores against shuffled product keys, with each row's own true tuple in its target column."""
    anchor, positive, scale = rows
    (keys,) = cols
    scaled = scale * anchor.float()
    s = scaled @ keys[start:stop].float().T
    # rows whose target column lies in this tile take their true tuple's MIP there; the others
    # write back what is there: no host read of which rows those are
    inside = (targets >= start) & (targets < stop)
    column = (targets - start).clamp(0, stop - start - 1)[:, None]
    true_mip = (scaled * positive.float()).sum(1, keepdim=True)
    return s.scatter(1, column, torch.where(inside[:, None], true_mip, s.gather(1, column)))


def _fingerprint(perms) -> torch.Tensor:
    # any difference between ranks' permutations changes this with overwhelming probability
    total = torch.zeros((), dtype=torch.long)
    for per_anchor in perms:
        for p in per_anchor:
            p = p.detach().long().cpu()
            total = total * 1_000_003 + (p * torch.arange(1, p.numel() + 1)).sum()
    return total.reshape(1)


def _draw_permutations(n_modalities, n_valid, generator, world, device):
    """One permutation per (anchor, non-anchor) pair, drawn in the package's order."""
    if generator is None and world > 1:
        # every rank must shuffle the global batch alike: rank 0's draw seeds them all (the seed
        # drawn from the CPU generator, as ever, then moved: NCCL takes device tensors only)
        seed = torch.randint(0, 2**62, (1,), device="cpu").to(device)
        generator = torch.Generator().manual_seed(int(gather_rows(seed, with_grad=False)[0][0]))
    # the global CPU generator when none is given, exactly as the package's torch.randperm(B)
    gen_device = generator.device if generator is not None else "cpu"
    return [
        [
            torch.randperm(n_valid, generator=generator, device=gen_device).to(device)
            for _ in range(n_modalities - 1)
        ]
        for _ in range(n_modalities)
    ]


def valid_count_and_all(valid_all: torch.Tensor) -> tuple[int, bool]:
    """(valid samples in the global batch, whether all are): the loss's one host read, since the
    sizes of the permutations and of the tuple space depend on it."""
    count, every = torch.stack([valid_all.sum(), valid_all.all().long()]).tolist()
    return count, bool(every)


def symile_loss(
    reps: list[torch.Tensor] | tuple[torch.Tensor, ...],
    logit_scale: torch.Tensor,
    *,
    negatives: str = "n",
    valid: torch.Tensor | None = None,
    permutations: list[list[torch.Tensor]] | None = None,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    tile: int | None = None,
) -> torch.Tensor:
    """Symile loss over M >= 2 modalities; mean over anchors of the mean cross-entropy per row.

    reps: M tensors (n, d), row i of each belongs to sample i (L2-normalised in practice);
    logit_scale: (), already exp()-ed, multiplies the MIP. negatives: "n" or "n_squared" (see
    the module docstring); for M = 2 "n_squared" is symmetric InfoNCE (the package refuses
    M = 2 there) and "n" is InfoNCE against a shuffled key set.

    valid: (n,) bool, False where a sample lacks any of the M modalities. Such samples are left
    out: they are no anchor row and appear in no column (no tuple uses them). This is masking,
    not the paper's learned / mean placeholder for a missing modality: a placeholder would still
    supply (uninformative) negatives, whereas here the loss is Symile on the complete samples
    only, and partial samples can still feed pairwise terms.

    permutations ("n" only): M lists of M - 1 LongTensors, permutations[m][k] shuffles the k-th
    non-anchor (in modality order, skipping m) over the valid samples of the global batch, in
    their order; the same on every rank. generator ("n" only): draws them instead, in that order
    with torch.randperm; in a distributed run it must be seeded alike on every rank (checked).
    Neither: in one process the global RNG, so under torch.manual_seed(s) the negatives are the
    `symile` package's; distributed, a seed drawn on rank 0 is shared, so ranks agree.

    Distributed: every rank's reps are gathered with gradients; local rows are scored against
    the global columns (for "n": the global batch's valid samples shuffled by the one shared set
    of permutations, so the ranks' row losses together are the one-process loss on the
    concatenated batch) and the result is scaled by world size like info_nce, so data-parallel
    averaging gives the global loss. Returns a scalar.
    """
    reps = list(reps)
    if len(reps) < 2:
        raise ValueError(f"symile_loss needs at least 2 modalities, got {len(reps)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives={negatives!r}; allowed: {', '.join(NEGATIVES)}")
    if any(r.shape != reps[0].shape for r in reps):
        raise ValueError(f"all reps must have one shape (n, d), got {[tuple(r.shape) for r in reps]}")
    if negatives == "n_squared" and (permutations is not None or generator is not None):
        raise ValueError('permutations / generator only apply to negatives="n"')
    n_mod, n, device = len(reps), reps[0].shape[0], reps[0].device
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.bool()
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=device)
    _, world = world_info()

    if world == 1:
        reps_all, valid_all, offset = reps, valid, 0
    else:
        reps_all = [gather_rows(r)[0] for r in reps]
        valid_all, offset = gather_rows(valid)
    n_valid, everything = valid_count_and_all(valid_all)
    if n_valid == 0:
        return sum(r.sum() for r in reps) * 0.0
    cols = reps_all if everything else [r[valid_all] for r in reps_all]
    rows = reps if everything else [r[valid] for r in reps]
    # position of each local valid row among the global valid samples = its column
    if everything:
        position = torch.arange(offset, offset + n, device=device)
    else:
        position = (torch.cumsum(valid_all.long(), 0) - 1)[offset : offset + n][valid]

    if negatives == "n":
        chosen = generator is not None or permutations is not None
        if permutations is None:
            permutations = _draw_permutations(n_mod, n_valid, generator, world, device)
        elif len(permutations) != n_mod or any(len(p) != n_mod - 1 for p in permutations):
            raise ValueError(f"permutations must be {n_mod} lists of {n_mod - 1} permutations")
        if any(p.numel() != n_valid for per in permutations for p in per):
            raise ValueError(f"each permutation must have one entry per valid global sample ({n_valid})")
        if world > 1 and chosen:
            prints = gather_rows(_fingerprint(permutations).to(device), with_grad=False)[0]
            if bool((prints != prints[0]).any()):
                raise ValueError(
                    "Symile negatives differ between ranks: seed the generator alike on every rank"
                )

    total = 0.0
    for m in range(n_mod):
        others = [k for k in range(n_mod) if k != m]
        if negatives == "n_squared":
            n_cols = n_valid ** len(others)
            # the true tuple (g, g, ..., g) in mixed radix
            targets = position * sum(n_valid**k for k in range(len(others)))
            row_loss, _ = tiled_score_cross_entropy(
                _all_tuples_scores,
                (rows[m], scale),
                tuple(cols[k] for k in others),
                n_cols,
                targets,
                label_smoothing=label_smoothing,
                tile=tile or _whole_runs_tile(rows[m].shape[0], n_valid),
            )
        else:
            keys, positive = None, None
            for k, perm in zip(others, permutations[m], strict=True):
                shuffled = cols[k][perm.to(device)].float()
                keys = shuffled if keys is None else keys * shuffled
                positive = rows[k].float() if positive is None else positive * rows[k].float()
            row_loss, _ = tiled_score_cross_entropy(
                lambda r, c, a, b: _shuffled_scores(r, c, a, b, position),
                (rows[m], positive, scale),
                (keys,),
                n_valid,
                position,
                label_smoothing=label_smoothing,
                tile=tile,
            )
        total = total + row_loss.sum()
    return total * (world / (n_mod * n_valid))
