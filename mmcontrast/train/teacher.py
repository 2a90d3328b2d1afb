"""An EMA teacher for self-distillation terms (degla): a frozen float32 copy of the model whose
weights follow the student's, t <- decay * t + (1 - decay) * s, after every optimizer step."""

from __future__ import annotations

import copy

import torch


class EmaTeacher:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach().float(), 1.0 - self.decay)
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            t.copy_(s)

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
