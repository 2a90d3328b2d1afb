"""Run-to-run exactness where it holds. CPU kernels are bitwise reproducible, so a resumed run
and an uninterrupted one must agree bit for bit there. CUDA kernels are not (atomic adds in index
and scatter backwards, cuBLAS and cuDNN algorithm choice), so on a GPU they agree within a
tolerance instead; one training run compared with itself stays exact everywhere."""

from __future__ import annotations

import math

import torch

ON_GPU = torch.cuda.is_available()
REL, ABS = (1e-4, 1e-6) if ON_GPU else (0.0, 0.0)


def same_number(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=REL, abs_tol=ABS) or (math.isnan(a) and math.isnan(b))
    return a == b


def same_record(a: dict, b: dict) -> bool:
    """Two metrics records: the same keys, numbers within the run-to-run tolerance."""
    return a.keys() == b.keys() and all(
        same_number(a[k], b[k]) if isinstance(a[k], (int, float)) else a[k] == b[k] for k in a
    )


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not ON_GPU:
        return torch.equal(a, b)
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=REL, atol=ABS)
