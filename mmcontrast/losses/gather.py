"""The one place distribution enters the losses: gather every rank's rows, with gradients.

Ranks may hold different numbers of rows. Backward sums every rank's gradient for the gathered
tensor and hands each rank the sum for its own rows (one reduce-scatter), so a key's gradient
reaches the rank that computed it.

Inside a `GatherScope` (the Objective opens one per call) a tensor that several terms or pairs
gather is gathered once, so its gradient is reduced once too, and row counts are exchanged once
per size, or not at all when the caller knows every rank holds the same rows (training batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherScope:
    """Context manager: memoises gather_rows within one objective call. equal_rows=True says
    every rank's tensors have this rank's number of rows (the trainer's full batches), so no
    size is exchanged and no host read is made for it."""

    def __init__(self, equal_rows: bool = False):
        self.equal_rows = equal_rows
        self.gathered: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, int]]] = {}
        self.counts: dict[tuple, list[int]] = {}
        self._outer = None

    def __enter__(self) -> GatherScope:
        global _scope
        self._outer, _scope = _scope, self
        return self

    def __exit__(self, *exc) -> None:
        global _scope
        _scope = self._outer
        self.gathered.clear()


_scope: GatherScope | None = None


def _counts(n: int, device) -> list[int]:
    if _scope is None:
        return _row_counts(n, device)
    if _scope.equal_rows:
        return [n] * dist.get_world_size()
    key = (n, str(device))
    if key not in _scope.counts:
        _scope.counts[key] = _row_counts(n, device)
    return _scope.counts[key]


def _row_counts(n: int, device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, offset):
        ctx.counts, ctx.n = counts, x.shape[0]
        return _all_gather_rows(x, counts)

    @staticmethod
    def backward(ctx, grad):
        # reduce-scatter: each rank receives only the summed gradient of its own rows
        counts, longest = ctx.counts, max(ctx.counts)
        if all(c == longest for c in counts):
            padded = grad.contiguous()
        else:
            padded = grad.new_zeros((len(counts) * longest, *grad.shape[1:]))
            start = 0
            for r, c in enumerate(counts):
                padded[r * longest : r * longest + c] = grad[start : start + c]
                start += c
        mine = grad.new_empty((longest, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, padded, op=dist.ReduceOp.SUM)
        return mine[: ctx.n], None, None


def gather_rows(x: torch.Tensor, *, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """(n_local, ...) -> ((n_global, ...), offset of this rank's rows in the result)."""
    rank, world = world_info()
    if world == 1:
        return x, 0
    with_grad = with_grad and x.requires_grad
    key = (id(x), x._version, with_grad)
    if _scope is not None and key in _scope.gathered:
        return _scope.gathered[key][1]
    counts = _counts(x.shape[0], x.device)
    offset = sum(counts[:rank])
    if with_grad:
        result = _GatherRows.apply(x, counts, offset), offset
    else:
        result = _all_gather_rows(x.detach(), counts), offset
    if _scope is not None:
        _scope.gathered[key] = (x, result)  # holding x keeps its id from being reused
    return result


def global_valid(
    valid: torch.Tensor | None, n: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local mask, every rank's mask, number of valid rows in the global batch); an absent mask
    means every local row is valid. Masks carry no gradient."""
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.bool()
    valid_all, _ = gather_rows(valid)
    return valid, valid_all, valid_all.sum()


def valid_summary(valid_all: torch.Tensor, total: torch.Tensor, at_least: int = 1) -> tuple[bool, bool]:
    """(at least `at_least` samples of the global batch valid, every sample valid): the loss's
    one host read, which decides whether it needs masking at all."""
    enough, every = torch.stack([total >= at_least, valid_all.all()]).tolist()
    return bool(enough), bool(every)


def sum_valid(losses: torch.Tensor, valid: torch.Tensor, every: bool) -> torch.Tensor:
    """The valid rows' losses summed: a plain sum when every row is valid (no boolean indexing,
    which reads the device)."""
    return losses.sum() if every else losses[valid].sum()


def share_of_global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """local_sum * world / (local_count summed over ranks): averaging it over ranks (data-parallel
    gradient averaging) gives the mean over every rank's items; zero (with a graph) when none."""
    _, world = world_info()
    total = local_count.detach().clone().to(local_sum.device)
    if world > 1:
        dist.all_reduce(total)
    # total == 0 leaves every rank's sum over nothing, 0: clamping gives 0 without a host read
    return local_sum * (world / total.clamp(min=1).to(local_sum.dtype))
