"""InfoNCE against open_clip's ClipLoss, a dense formula, and one process on the whole batch."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mmcontrast.config import ConfigError, TermConfig, resolve_pairs, resolve_weighted_pairs
from mmcontrast.losses import Objective, info_nce
from tests.distributed import run_ranks

torch.set_default_dtype(torch.float32)


def _pair(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(
        torch.randn(n, d, generator=g), dim=1
    )


@pytest.mark.parametrize("n,d", [(1, 16), (7, 32), (64, 128)])
def test_equals_open_clip_clip_loss(n, d):
    a, b = _pair(n, d)
    scale = torch.tensor(14.3)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours = info_nce(a1, b1, scale)
    ref = ClipLoss()(a2, b2, scale)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-7)


def _dense_reference(a, b, scale, valid, eps):
    """Explicit formula: keep only valid samples, then the smoothed symmetric CE."""
    a, b = a[valid], b[valid]
    logits = scale * a @ b.T
    labels = torch.arange(len(a))
    return 0.5 * (
        F.cross_entropy(logits, labels, label_smoothing=eps)
        + F.cross_entropy(logits.T, labels, label_smoothing=eps)
    )


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mask_and_label_smoothing_match_dense_formula(eps):
    a, b = _pair(20, 16, seed=3)
    valid = torch.ones(20, dtype=torch.bool)
    valid[[2, 5, 11]] = False
    scale = torch.tensor(9.0)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours = info_nce(a1, b1, scale, valid=valid, label_smoothing=eps)
    ref = _dense_reference(a2, b2, scale, valid, eps)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-7)
    assert a1.grad[~valid].abs().max() == 0  # masked rows neither query nor serve as negatives


def test_no_valid_sample_gives_zero_with_graph():
    a, b = _pair(4, 8)
    a.requires_grad_()
    loss = info_nce(a, b, torch.tensor(10.0), valid=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and a.grad.abs().sum() == 0


class _Towers(torch.nn.Module):
    """Three linear 'towers' so the test checks parameter gradients, as training sees them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.ModuleDict({m: torch.nn.Linear(12, 8) for m in ("image", "text", "audio")})
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))

    def forward(self, x):
        return {m: F.normalize(self.proj[m](x[m]), dim=1) for m in self.proj}


def _batch(n):
    g = torch.Generator().manual_seed(42)
    x = {m: torch.randn(n, 12, generator=g) for m in ("image", "text", "audio")}
    present = {m: torch.ones(n, dtype=torch.bool) for m in x}
    present["audio"][[1, 6]] = False  # a sample lacking audio on each rank
    return x, present


def _counting_collectives(calls: dict) -> None:
    import torch.distributed as dist

    for name in ("all_gather", "all_reduce", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _loss_and_grads(rank, world, sizes, equal_rows=False):
    x, present = _batch(sum(sizes))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x = {m: v[lo:hi] for m, v in x.items()}
    present = {m: v[lo:hi] for m, v in present.items()}
    model = _Towers()
    objective = Objective.from_config(
        type("L", (), {"terms": [TermConfig(pairs="all")]})(), ["image", "text", "audio"]
    )
    embeddings = model(x)
    calls = {}
    _counting_collectives(calls)
    loss, _ = objective(embeddings, present, model.logit_scale.exp(), equal_rows=equal_rows)
    forward_calls = dict(calls)
    loss.backward()
    backward_calls = {k: v - forward_calls.get(k, 0) for k, v in calls.items() if v > forward_calls.get(k, 0)}
    return (
        loss.item(),
        {n: p.grad.clone() for n, p in model.named_parameters()},
        forward_calls,
        backward_calls,
    )


@pytest.mark.parametrize(
    ("sizes", "equal_rows", "gathers"),
    # three pairs over three modalities: each modality's embeddings gathered once (3), each
    # pair's mask (3), and the row counts exchanged once, or not at all for equal batches
    [((4, 4), True, 6), ((4, 4), False, 7), ((3, 6), False, 7)],
)
def test_two_gloo_ranks_equal_one_process_on_concatenated_batch(sizes, equal_rows, gathers):
    single_loss, single_grads, _, _ = _loss_and_grads(0, 1, (sum(sizes),))
    ranks = run_ranks(2, _loss_and_grads, sizes, equal_rows)
    mean_loss = sum(r[0] for r in ranks) / 2  # what data-parallel averaging sees
    assert abs(mean_loss - single_loss) < 1e-5
    for name, grad in single_grads.items():
        averaged = sum(r[1][name] for r in ranks) / 2
        torch.testing.assert_close(averaged, grad, atol=1e-5, rtol=0)
    for _, _, forward_calls, backward_calls in ranks:
        assert forward_calls.get("all_gather") == gathers
        assert backward_calls == {"reduce_scatter_tensor": 3}  # one gradient reduction per modality


def test_pair_specs():
    mods = ["image", "text", "audio"]
    assert resolve_pairs("all", mods) == [("image", "text"), ("image", "audio"), ("text", "audio")]
    assert resolve_pairs("anchor:text", mods) == [("text", "image"), ("text", "audio")]
    assert resolve_pairs([["audio", "image"]], mods) == [("audio", "image")]
    assert resolve_weighted_pairs([["audio", "image", 0.5], ["text", "image"]], mods) == [
        ("audio", "image", 0.5),
        ("text", "image", 1.0),
    ]
    for bad in (
        [["audio", "image", -1]],
        [["audio", "image"], ["image", "audio"]],
        [["audio"]],
        "anchor:smell",
    ):
        with pytest.raises(ConfigError):
            resolve_weighted_pairs(bad, mods)


def test_pair_weights_scale_each_pair():
    mods = ["image", "text", "audio"]
    x, present = _batch(8)
    model = _Towers()
    emb = model(x)

    def objective(pairs):
        cfg = type("L", (), {"terms": [TermConfig(pairs=pairs, weight=2.0)]})()
        return Objective.from_config(cfg, mods)(emb, present, model.logit_scale.exp())

    total, parts = objective([["image", "text", 0.25], ["text", "audio", 3.0]])
    expected = 2.0 * (0.25 * parts["info_nce/image-text"] + 3.0 * parts["info_nce/text-audio"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"info_nce/image-text", "info_nce/text-audio"}
