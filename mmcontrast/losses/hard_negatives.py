"""Hard-negative objectives over the gathered global batch, through the tiled core.

    negclip               negative captions as extra image -> text columns (NegCLIP)
    hard_negative_nce     importance-weighted hardest negatives with debiasing (Robinson et al.,
                          "Contrastive Learning with Hard Negative Samples": beta, tau_plus);
                          row blocks with recomputation, as each row drops its own positive
    hard_negative_mixing  synthetic negatives mixed from each query's hardest ones (MoCHi)

Shapes: a, b, image, text (n, d) L2-normalised rows of this rank; negatives (n, k, d) with
negatives_valid (n, k); logit_scale () already exp()-ed. Every function returns this rank's share
of the mean over all valid samples of every rank, times the world size (as info_nce).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmcontrast.losses.gather import gather_rows, global_valid, sum_valid, valid_summary, world_info
from mmcontrast.losses.tiled import default_tile, tiled_cross_entropy


def _zero(*tensors) -> torch.Tensor:
    return sum(t.sum() for t in tensors) * 0.0


def negclip(image, text, negatives, logit_scale, *, valid=None, negatives_valid=None, tile=None):
    """Symmetric InfoNCE whose image -> text columns are every rank's captions plus every rank's
    negative captions; text -> image is CLIP's. Negatives of samples outside `valid` are dropped."""
    n, k, d = negatives.shape
    valid, valid_all, total = global_valid(valid, n, image.device)
    some, every = valid_summary(valid_all, total)
    if not some:
        return _zero(image, text, negatives)
    _, world = world_info()
    neg_valid = (
        torch.ones(n, k, dtype=torch.bool, device=image.device)
        if negatives_valid is None
        else negatives_valid
    )
    neg_valid = (neg_valid & valid[:, None]).reshape(n * k)
    text_all, offset = gather_rows(text)
    image_all, _ = gather_rows(image)
    neg_all, _ = gather_rows(negatives.reshape(n * k, d))
    neg_valid_all, _ = gather_rows(neg_valid)
    targets = torch.arange(n, device=image.device) + offset
    i2t, _ = tiled_cross_entropy(
        image,
        torch.cat([text_all, neg_all]),
        logit_scale,
        targets,
        row_valid=valid,
        col_valid=torch.cat([valid_all, neg_valid_all]),
        tile=tile,
    )
    t2i, _ = tiled_cross_entropy(
        text, image_all, logit_scale, targets, row_valid=valid, col_valid=valid_all, tile=tile
    )
    return (sum_valid(i2t, valid, every) + sum_valid(t2i, valid, every)) * (world / (2.0 * total))


def _hcl_rows(q, k_all, logit_scale, targets, valid_all, n_neg, beta, tau_plus):
    """HCL loss of a block of rows against every column, in float32 (c x N scores).

    With L = lse_neg((1+beta) s) - lse_neg(beta s) - s_pos, the reweighted negative mass over the
    positive is Ng / e^{s_pos} = N e^L; debiased, N (e^L - tau+) / (1 - tau+); floored at
    N e^{-scale - s_pos} (every negative at cosine -1); loss = log(1 + that)."""
    s = logit_scale.float() * (q.float() @ k_all.float().T)
    rows = torch.arange(q.shape[0], device=q.device)
    s_pos = s[rows, targets]
    negative = valid_all[None, :].expand_as(s).clone()
    negative[rows, targets] = False
    log_ratio = (
        torch.logsumexp(((1.0 + beta) * s).masked_fill(~negative, -math.inf), 1)
        - torch.logsumexp((beta * s).masked_fill(~negative, -math.inf), 1)
        - s_pos
    )
    if tau_plus > 0:
        shrink = tau_plus * torch.exp(-log_ratio)
        log_ratio = torch.where(
            shrink < 1.0,
            log_ratio + torch.log1p(-shrink.clamp_max(1.0 - 1e-7)),
            torch.full_like(s_pos, -math.inf),
        ) - math.log1p(-tau_plus)
    floor = -logit_scale.float() - s_pos
    return F.softplus(torch.log(n_neg) + torch.maximum(log_ratio, floor))


def _hcl_direction(q, k_all, logit_scale, targets, valid_all, n_neg, beta, tau_plus, tile):
    """Row blocks of about 2^23 scores, each recomputed in backward: the positive must leave its
    own row's negatives, which the column-tiled core's shared column mask cannot express."""
    block = max(1, tile * q.shape[0] // max(k_all.shape[0], 1))
    parts = [
        checkpoint(
            _hcl_rows,
            q[i : i + block],
            k_all,
            logit_scale,
            targets[i : i + block],
            valid_all,
            n_neg,
            beta,
            tau_plus,
            use_reentrant=False,
        )
        for i in range(0, q.shape[0], block)
    ]
    return torch.cat(parts)


def hard_negative_nce(a, b, logit_scale, *, beta=1.0, tau_plus=0.0, valid=None, tile=None):
    """Symmetric InfoNCE with hard-negative importance weighting (weights exp(beta * s)) and
    positive-unlabeled debiasing (class prior tau_plus) over every rank's negatives.
    beta=0, tau_plus=0 is InfoNCE."""
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    n = a.shape[0]
    valid, valid_all, total = global_valid(valid, n, a.device)
    n_neg = (total - 1).float()
    enough, every = valid_summary(valid_all, total, at_least=2)
    if not enough:
        return _zero(a, b)
    _, world = world_info()
    a_all, offset = gather_rows(a)
    b_all, _ = gather_rows(b)
    targets = torch.arange(n, device=a.device) + offset
    tile = tile or default_tile(n)
    ab = _hcl_direction(a, b_all, logit_scale, targets, valid_all, n_neg, beta, tau_plus, tile)
    ba = _hcl_direction(b, a_all, logit_scale, targets, valid_all, n_neg, beta, tau_plus, tile)
    return (sum_valid(ab, valid, every) + sum_valid(ba, valid, every)) * (world / (2.0 * total))


@torch.no_grad()
def mix_hard_negatives(
    q,
    keys,
    targets,
    col_valid,
    *,
    n_hard,
    n_mix,
    n_self,
    generator=None,
    tile=None,
    row_offset=0,
    total_rows=None,
):
    """MoCHi's synthetic negatives for each query row, detached: (n, n_mix + n_self, d).

    Among the keys that are valid and not the row's positive, the n_hard highest-scoring ones
    are mixed pairwise, h = normalize(alpha k_i + (1 - alpha) k_j), alpha ~ U(0, 1) (n_mix of
    them), and with the query, h' = normalize(beta q + (1 - beta) k_i), beta ~ U(0, 0.5) (n_self).
    Top-k runs over column tiles, so no n x N score matrix is held. Random draws are made for
    all `total_rows` rows of the global batch and this rank's rows [row_offset, +n) taken, so
    every rank split of a batch mixes the same negatives as one process would.
    """
    n, big_n = q.shape[0], keys.shape[0]
    n_hard = min(n_hard, int(col_valid.sum()) - 1)
    if n_hard < 1 or n_mix + n_self == 0:
        return q.new_zeros(n, 0, q.shape[1])
    tile = tile or default_tile(n)
    best_scores = q.new_full((n, 0), -math.inf, dtype=torch.float32)
    best_index = torch.zeros(n, 0, dtype=torch.long, device=q.device)
    rows = torch.arange(n, device=q.device)
    for start in range(0, big_n, tile):
        stop = min(start + tile, big_n)
        s = (q.float() @ keys[start:stop].float().T).masked_fill(~col_valid[None, start:stop], -math.inf)
        here = (targets >= start) & (targets < stop)
        s[rows[here], targets[here] - start] = -math.inf
        scores = torch.cat([best_scores, s], 1)
        index = torch.cat([best_index, torch.arange(start, stop, device=q.device).expand(n, -1)], 1)
        best_scores, pick = scores.topk(min(n_hard, scores.shape[1]), dim=1)
        best_index = index.gather(1, pick)
    hard = keys[best_index].float()  # (n, n_hard, d)
    total_rows = n if total_rows is None else total_rows
    mine = slice(row_offset, row_offset + n)

    def draw_index(k):
        return torch.randint(n_hard, (total_rows, k), generator=generator, device=q.device)[mine]

    def draw_uniform(k):
        return torch.rand(total_rows, k, 1, generator=generator, device=q.device)[mine]

    def pick(index):
        return hard.gather(1, index[..., None].expand(-1, -1, hard.shape[-1]))

    parts = []
    if n_mix:
        i, j, alpha = draw_index(n_mix), draw_index(n_mix), draw_uniform(n_mix)
        parts.append(F.normalize(alpha * pick(i) + (1 - alpha) * pick(j), dim=-1))
    if n_self:
        i, beta = draw_index(n_self), 0.5 * draw_uniform(n_self)
        parts.append(F.normalize(beta * q.float()[:, None, :] + (1 - beta) * pick(i), dim=-1))
    return torch.cat(parts, 1).to(q.dtype)


def _mixing_direction(q, k_all, logit_scale, targets, valid, valid_all, options, generator, tile):
    ce, _ = tiled_cross_entropy(
        q, k_all, logit_scale, targets, row_valid=valid, col_valid=valid_all, tile=tile
    )
    synthetic = mix_hard_negatives(
        q.detach(),
        k_all.detach(),
        targets,
        valid_all,
        generator=generator,
        tile=tile,
        row_offset=int(targets[0]) if len(targets) else 0,
        total_rows=k_all.shape[0],
        **options,
    )
    if synthetic.shape[1] == 0:
        return ce
    s_pos = logit_scale * (q * k_all[targets]).sum(-1)
    lse_synthetic = torch.logsumexp(
        logit_scale * torch.einsum("nd,nsd->ns", q.float(), synthetic.float()), dim=1
    )
    return torch.logaddexp(ce, lse_synthetic - s_pos)  # log(e^lse_keys + e^lse_synth) - s_pos


def hard_negative_mixing(
    a, b, logit_scale, *, n_hard=16, n_mix=16, n_self=8, valid=None, generator=None, tile=None
):
    """Symmetric InfoNCE where each row also sees synthetic negatives mixed from its hardest
    gathered negatives (mix_hard_negatives; they carry no gradient, as in MoCHi)."""
    n = a.shape[0]
    valid, valid_all, total = global_valid(valid, n, a.device)
    some, every = valid_summary(valid_all, total)
    if not some:
        return _zero(a, b)
    _, world = world_info()
    a_all, offset = gather_rows(a)
    b_all, _ = gather_rows(b)
    targets = torch.arange(n, device=a.device) + offset
    options = {"n_hard": n_hard, "n_mix": n_mix, "n_self": n_self}
    ab = _mixing_direction(a, b_all, logit_scale, targets, valid, valid_all, options, generator, tile)
    ba = _mixing_direction(b, a_all, logit_scale, targets, valid, valid_all, options, generator, tile)
    return (sum_valid(ab, valid, every) + sum_valid(ba, valid, every)) * (world / (2.0 * total))
