"""Numeric guard: a step whose loss or gradients are not finite changes no weight.

One check, at the optimizer step, agreed by every rank because the gradients are reduced
across ranks before it: a non-finite loss on any rank gives non-finite gradients (the chain rule
carries the NaN), so checking the gradients covers the loss too, and the step needs no host read
between forward and backward. DeepSpeed's bf16 and ZeRO optimizers already detect a non-finite
gradient norm and skip their step (`engine.was_step_applied()`); the plain fp32 stage-0 path
steps a torch optimizer that would not, so it gets `FiniteGuardedAdamW`.
A skipped step also leaves the buffers (BatchNorm statistics) as they were (`BufferSnapshot`).
Skipped steps are counted (`nonfinite_steps`), the batch's sample keys are logged, and after
`train.max_nonfinite_steps` in a row the run stops with `NonFiniteError`, writing no checkpoint.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mmcontrast.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the run stopped without a checkpoint of that state."""


class FiniteGuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step when a gradient is not finite, reporting it as DeepSpeed's own
    optimizers do (`overflow`), so the engine counts the skip and holds the LR schedule back.
    With max_grad_norm > 0 it also clips the gradients' global norm, as DeepSpeed's clipping
    would (the engine's own clipping is then off): one pass over the gradients serves both.

    Stage-0 gradients are all-reduced before the step, so every rank decides alike.
    """

    overflow = False

    def __init__(self, params, *, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self.overflow = False
            return super().step(closure)
        # DeepSpeed's formula: the root of the summed squared per-tensor norms
        total_norm = torch.stack(torch._foreach_norm(grads)).pow(2).sum().sqrt()
        self.overflow = not bool(total_norm.isfinite())  # the step's one host read
        if self.overflow:
            return None
        if self.max_grad_norm > 0:
            coefficient = torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient)
        return super().step(closure)


class BufferSnapshot:
    """The module's buffers (BatchNorm statistics) before a step: a skipped step's forward must
    not leave its statistics behind, which a NaN input would make NaN for good. Copies on the
    buffers' device, no host synchronisation."""

    def __init__(self, module: torch.nn.Module):
        self.buffers = list(module.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)


class NonFiniteCounter:
    """Counts skipped steps; raises NonFiniteError after `limit` in a row. Checkpointed."""

    def __init__(self, limit: int, last_checkpoint: int = 0):
        self.limit = limit
        self.total = 0
        self.in_a_row = 0
        self.last_checkpoint = last_checkpoint  # named in the stop message; the loop updates it

    def record(self, step: int, applied: bool, keys: list[str], reason: str) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        shown = ", ".join(keys[:16]) + (f" (+{len(keys) - 16} more)" if len(keys) > 16 else "")
        log.warning(
            "step %d: %s on some rank; skipped the optimizer step on every rank (%d in a row, "
            "%d in total). This rank's batch keys: %s",
            step,
            reason,
            self.in_a_row,
            self.total,
            shown,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite steps in a row (steps {step - self.in_a_row + 1}-{step}, "
                f"train.max_nonfinite_steps={self.limit}); stopped without writing a checkpoint. The "
                f"last checkpoint (step {self.last_checkpoint}) is intact; the skipped batches' sample keys "
                "are in the log above"
            )

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])
