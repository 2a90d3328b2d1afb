"""Contrastive-correct gradient accumulation (GradCache, Gao et al. 2021).

Accumulating micro-batch losses would give each micro-batch only its own negatives. Instead:
1. encode every micro-batch without a graph, saving the RNG state before each;
2. compute the loss on the whole batch of cached outputs and take its gradient with respect
   to those outputs;
3. replay each micro-batch's forward under its saved RNG state (same dropout and patch-dropout
   masks) and back-propagate the cached output gradients through it; then leave the RNG where
   the loss left it, so draws inside the loss (Symile permutations) differ from step to step.
The parameter gradients are those of the whole batch's loss. open_clip's accumulation reruns
the towers without restoring RNG, so its second pass sees other dropout masks.

BatchNorm towers normalise each micro-batch on its own statistics (as any accumulation does);
their running statistics move once per micro-batch, in the replay only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Outputs that are sums over a micro-batch (summed when merged) and shared scalars (taken once).
SUMMED = ("caption",)
SHARED = ("logit_scale", "logit_bias")


class RngState:
    """torch's CPU and current-CUDA-device generator states."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def split_batch(batch: dict, pieces: int) -> list[dict]:
    """Split every per-sample entry (tensors, lists, the present masks) into `pieces` parts."""
    size = (
        len(batch["__key__"])
        if "__key__" in batch
        else next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    )
    if size % pieces:
        raise ValueError(f"a batch of {size} cannot be split into {pieces} equal micro-batches")
    step = size // pieces

    def part(value, i):
        if isinstance(value, dict):
            return {k: part(v, i) for k, v in value.items()}
        if isinstance(value, (torch.Tensor, list, tuple)):
            return value[i * step : (i + 1) * step]
        return value

    return [{k: part(v, i) for k, v in batch.items()} for i in range(pieces)]


def merge_outputs(parts: list[dict]) -> dict:
    """Micro-batch outputs -> whole-batch outputs: per-sample tensors concatenated, SUMMED
    tuples added, SHARED scalars taken from the first part."""
    merged = {}
    for key, first in parts[0].items():
        if key in SHARED:
            merged[key] = first
        elif key in SUMMED:
            merged[key] = tuple(sum(p[key][i] for p in parts) for i in range(len(first)))
        else:
            merged[key] = torch.cat([p[key] for p in parts])
    return merged


def _leaves(outputs: dict) -> dict:
    """Detached copies that collect the loss gradient (floating tensors only)."""

    def leaf(value):
        if isinstance(value, tuple):
            return tuple(leaf(v) for v in value)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().requires_grad_()
        return value

    return {k: leaf(v) for k, v in outputs.items()}


def _flat(outputs: dict) -> list[tuple[str, torch.Tensor]]:
    items = []
    for key, value in outputs.items():
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                items.append((f"{key}.{i}", v))
    return items


@contextlib.contextmanager
def _frozen_batchnorm_stats(model: nn.Module):
    """Train-mode BatchNorm without updating running statistics (the replay updates them)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, saved, strict=True):
            m.track_running_stats = flag


def grad_cache_step(
    forward,
    compute_loss,
    batch: dict,
    pieces: int,
    backward,
    model: nn.Module | None = None,
):
    """Loss and parameter gradients of the whole batch, encoded in `pieces` micro-batches.

    forward(micro_batch) -> outputs dict (embeddings (b, d), "text_negatives" (b, k, d),
    "caption" (nll_sum, tokens), "logit_scale" ()); compute_loss(outputs) -> (loss, parts) on
    the merged outputs; backward(surrogate) is called once per micro-batch (e.g.
    engine.backward without gradient-accumulation scaling). Returns (loss, parts), detached.
    """
    micro = split_batch(batch, pieces)
    states, cached = [], []
    with torch.no_grad(), _frozen_batchnorm_stats(model) if model is not None else contextlib.nullcontext():
        for piece in micro:
            states.append(RngState())
            cached.append(forward(piece))

    leaves = [_leaves(out) for out in cached]
    loss, parts = compute_loss(merge_outputs(leaves))
    # after the loss's own draws (Symile permutations, MoCHi mixing), so the next step's differ
    after = RngState()
    keyed = {(i, name): leaf for i, out in enumerate(leaves) for name, leaf in _flat(out)}
    grads = dict(zip(keyed, torch.autograd.grad(loss, list(keyed.values()), allow_unused=True), strict=True))

    for i, (piece, state) in enumerate(zip(micro, states, strict=True)):
        state.restore()
        surrogate = 0.0
        for name, value in _flat(forward(piece)):
            grad = grads.get((i, name))
            if grad is not None:
                surrogate = surrogate + (value.float() * grad.float()).sum()
        if not isinstance(surrogate, torch.Tensor):  # nothing of this piece reached the loss
            raise RuntimeError("no output of this micro-batch reaches the loss")
        backward(surrogate)
    after.restore()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}
