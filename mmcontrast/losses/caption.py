"""CoCa's captioning loss: teacher-forced next-token cross-entropy, a chunk of tokens at a time.

The decoder's last hidden states (b, L, w) times the output projection (w, V) are b x L x V
logits: 0.96 GB in float32 at b=64, L=75, V=49408, and autograd keeps several such tensors. Here
padding tokens are dropped first, and the logits of `chunk` tokens at a time are made, reduced
and differentiated in the same pass (softmax minus one-hot), so neither forward nor backward
ever holds more than chunk x V of them (the "fused linear cross-entropy" idea).
"""

from __future__ import annotations

import torch

from mmcontrast.losses.gather import share_of_global_mean

# chunk x V logits per temporary: 2^23 floats = 32 MiB, as for the contrastive tiles
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def default_chunk(vocab_size: int) -> int:
    return max(16, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


class LinearCrossEntropySum(torch.autograd.Function):
    """(h (n, w), weight (w, V), targets (n,) int) -> sum_i -log softmax(h_i @ weight)[targets_i].

    Gradients are computed during forward, chunk by chunk, and only scaled in backward.
    Arithmetic is float32 whatever the input dtype, as open_clip's CoCaLoss sees float32 logits.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hf, wf = h.float(), weight.float()
        total = hf.new_zeros(())
        grad_h = torch.zeros_like(hf) if want_h else None
        grad_w = torch.zeros_like(wf) if want_w else None
        for start in range(0, hf.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = hf[rows] @ wf  # (c, V)
            t = targets[rows]
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                d_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                d_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if want_h:
                    grad_h[rows] = d_logits @ wf.T
                if want_w:
                    grad_w.addmm_(hf[rows].T, d_logits)
        ctx.in_dtypes = (h.dtype, weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.in_dtypes
        grad_h = None if grad_h is None else (grad_h * grad_total).to(h_dtype)
        grad_w = None if grad_w is None else (grad_w * grad_total).to(w_dtype)
        return grad_h, grad_w, None, None


def caption_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    pad_id: int = 0,
    valid: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of this rank's captions, and the token count.

    hidden: (b, L, w) decoder states before the output projection; weight: (w, V) that
    projection; labels: (b, L) the next token at each position, `pad_id` where there is none;
    valid: (b,) bool, False for samples lacking an image or a caption (none of their tokens
    count). chunk: tokens per logits chunk (default: about 2^23 logits).
    Returns (nll_sum (), tokens () long).
    """
    keep = labels != pad_id
    if valid is not None:
        keep = keep & valid[:, None]
    chunk = chunk or default_chunk(weight.shape[1])
    nll = LinearCrossEntropySum.apply(hidden[keep], weight, labels[keep], chunk)
    return nll, keep.sum()


def caption_loss(nll_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over every rank's captions, as this rank's share (x world size, like
    info_nce), so that data-parallel gradient averaging gives the global mean. In one process
    it is open_clip's CoCaLoss caption part (cross-entropy ignoring padding)."""
    return share_of_global_mean(nll_sum, tokens)
