"""Every tensor that enters a collective lives on the embeddings' device: NCCL refuses a CPU
tensor (at any world size), so a tensor made without `device=` crashes a GPU run.

A CPU machine cannot show that directly. These runs make `meta` the default device, so a tensor
made without `device=` lands there, as a GPU run's lands on the CPU, while the embeddings live on
the CPU; every collective then checks its tensors against the embeddings' device. On a machine
with a GPU the same losses also run on CUDA under NCCL itself (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import run_ranks

COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def check_collective_devices(expected: torch.device, misplaced: list[str]) -> None:
    """Wrap torch.distributed's collectives: a tensor on another device is recorded (by the
    collective's name) and replaced by a CPU stand-in, so the run goes on to the next one."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            found = [t for t in _tensors(list(args) + list(kwargs.values())) if t.device != expected]
            if found:
                misplaced.append(f"{_name} got a tensor on {found[0].device}")
                return None
            return _original(*args, **kwargs)

        setattr(dist, name, checked)


def _every_loss(rank, world, device_name="cpu"):
    from mmcontrast.losses.gram import gram_loss
    from mmcontrast.losses.hard_negatives import hard_negative_mixing, hard_negative_nce, negclip
    from mmcontrast.losses.info_nce import info_nce
    from mmcontrast.losses.siglip import siglip
    from mmcontrast.losses.symile import symile_loss

    device = torch.device(device_name, rank) if device_name == "cuda" else torch.device("cpu")
    misplaced: list[str] = []
    check_collective_devices(device, misplaced)
    if device_name == "cpu":
        torch.set_default_device("meta")
    gen = torch.Generator(device=device).manual_seed(rank)
    n, d = 6, 8

    def emb():
        return F.normalize(torch.randn(n, d, generator=gen, device=device), dim=-1).requires_grad_()

    a, b, c = emb(), emb(), emb()
    scale = torch.tensor(10.0, device=device)
    bias = torch.tensor(-5.0, device=device)
    valid = torch.ones(n, dtype=torch.bool, device=device)
    valid[rank] = False
    negatives = F.normalize(torch.randn(n, 2, d, generator=gen, device=device), dim=-1)
    losses = {
        "info_nce": lambda: info_nce(a, b, scale, valid=valid),
        "siglip": lambda: siglip(a, b, scale, bias, valid=valid),
        "symile_n": lambda: symile_loss([a, b, c], scale, negatives="n", valid=valid),
        "symile_n_squared": lambda: symile_loss([a, b, c], scale, negatives="n_squared", valid=valid),
        "gram": lambda: gram_loss(a, [b, c], 1.0 / scale, valid=valid),
        "negclip": lambda: negclip(a, b, negatives, scale, valid=valid),
        "hard_negative_nce": lambda: hard_negative_nce(a, b, scale, beta=0.5, valid=valid),
        "hard_negative_mixing": lambda: hard_negative_mixing(a, b, scale, n_hard=3, n_mix=2, n_self=1),
    }
    report = {}
    for name, loss_fn in losses.items():
        misplaced.clear()
        try:
            loss = loss_fn()
            loss.backward()
            ok = loss.device == device
        except Exception as exc:  # a misplaced tensor breaks the run after the skipped collective
            ok, misplaced[:] = False, [*misplaced, f"{type(exc).__name__}: {exc}"]
        report[name] = "ok" if ok and not misplaced else "; ".join(misplaced) or "loss off device"
    return report


def test_every_collective_tensor_lives_on_the_embeddings_device():
    for rank, report in enumerate(run_ranks(2, _every_loss)):
        bad = {name: why for name, why in report.items() if why != "ok"}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two ranks under NCCL need two GPUs")
def test_every_loss_runs_under_nccl_on_cuda():
    # at world size 1 the losses make no collective; one GPU's check is a training run's
    for rank, report in enumerate(run_ranks(2, _every_loss, "cuda", backend="nccl")):
        bad = {name: why for name, why in report.items() if why != "ok"}
        assert not bad, f"rank {rank}: {bad}"


def test_the_check_catches_a_tensor_made_without_a_device():
    """The check itself: a seed made on the default device is caught (the old Symile defect)."""
    assert run_ranks(2, _default_device_seed) == [["all_gather got a tensor on meta"]] * 2


def _default_device_seed(rank, world):
    from mmcontrast.losses.gather import gather_rows

    misplaced: list[str] = []
    check_collective_devices(torch.device("cpu"), misplaced)
    torch.set_default_device("meta")
    with torch.no_grad():
        try:
            gather_rows(torch.randint(0, 2**62, (1,)), with_grad=False)
        except Exception:
            pass
    return misplaced
