"""An exponential moving average of the model's weights: a frozen float32 copy that follows the
trained weights, ema <- decay * ema + (1 - decay) * weights, every `every` optimizer steps.

One mechanism for two users: train.ema (evaluated beside the raw weights, exported with
`mmcontrast export --ema`) and the EMA teacher of self-distillation terms (degla).
"""

from __future__ import annotations

import copy

import torch


class WeightEma:
    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        self.decay, self.every = decay, every
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        # locked parameters never change: the average of a constant is the constant
        self._trained = {name for name, p in model.named_parameters() if p.requires_grad}
        self._averaged = [p for name, p in self.model.named_parameters() if name in self._trained]
        self._followed: list[torch.Tensor] | None = None  # the trained model's, found at the first update

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based), on every `every`-th step."""
        if step % self.every:
            return
        if self._followed is None:
            self._followed = [p for name, p in model.named_parameters() if name in self._trained]
        torch._foreach_lerp_(self._averaged, [p.detach().float() for p in self._followed], 1.0 - self.decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        floats = {
            k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in batch.items()
        }
        return self.model(floats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
