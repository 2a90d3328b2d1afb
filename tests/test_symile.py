"""Symile loss against the PyPI `symile` package, brute-force dense formulas, masks, 2 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F
from symile import Symile

from mmcontrast.losses.symile import mip_scores, symile_loss
from tests.distributed import run_ranks


def _reps(n_mod, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(n_mod)]


def _mask(n, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(n, dtype=torch.bool)
    valid[torch.randperm(n, generator=g)[: max(1, n // 4)]] = False
    return valid


def _grads(fn, reps, scale):
    leaves = [r.detach().clone().requires_grad_() for r in reps]
    s = torch.tensor(float(scale), requires_grad=True)
    loss = fn(leaves, s)
    loss.backward()
    return loss.detach(), [x.grad if x.grad is not None else torch.zeros_like(x) for x in [*leaves, s]]


def _close(x, y):
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _same(ours, ref):
    _close(ours[0], ref[0])
    for u, v in zip(ours[1], ref[1], strict=True):
        _close(u, v)


def _dense_all_tuples(reps, scale, eps=0.0):
    """Brute force: logits against every tuple of the other modalities, via cartesian_prod."""
    n, d = reps[0].shape
    losses = []
    for m, anchor in enumerate(reps):
        others = [r for k, r in enumerate(reps) if k != m]
        idx = torch.cartesian_prod(*[torch.arange(n)] * len(others)).reshape(-1, len(others))
        prod = torch.ones(idx.shape[0], d)
        for k, o in enumerate(others):
            prod = prod * o[idx[:, k]]
        target = (idx == idx[:, :1]).all(1).nonzero().squeeze(1)  # (i, i, ..., i), ascending i
        losses.append(F.cross_entropy(scale * anchor @ prod.T, target, label_smoothing=eps))
    return sum(losses) / len(reps)


def _dense_shuffled(reps, scale, perms, eps=0.0):
    """Brute force "n": shuffled product keys, true tuple on the diagonal."""
    n = reps[0].shape[0]
    losses = []
    for m, anchor in enumerate(reps):
        others = [r for k, r in enumerate(reps) if k != m]
        keys, true = torch.ones_like(anchor), anchor
        for o, p in zip(others, perms[m], strict=True):
            keys, true = keys * o[p], true * o
        logits = anchor @ keys.T
        logits = torch.where(torch.eye(n, dtype=torch.bool), true.sum(1)[:, None], logits)
        losses.append(F.cross_entropy(scale * logits, torch.arange(n), label_smoothing=eps))
    return sum(losses) / len(reps)


def _record_package_perms(monkeypatch, run):
    """Run `run()` with torch.randperm recorded; returns its result and the draws in order."""
    drawn, real = [], torch.randperm

    def recording(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(torch, "randperm", recording)
    try:
        out = run()
    finally:
        monkeypatch.setattr(torch, "randperm", real)
    return out, drawn


# ----------------------------------------------------------------- against the package


# tiles of whole runs of the last modality (None; 72 = 3 x 24) and ragged ones (gathered columns)
CASES = [(3, 1, 4, None), (3, 32, 16, None), (3, 24, 8, 72), (3, 9, 16, 5), (3, 48, 32, 1000), (4, 6, 8, 7)]


@pytest.mark.parametrize("n_mod,n,d,tile", CASES)
def test_n_squared_equals_package(n_mod, n, d, tile):
    reps = _reps(n_mod, n, d, seed=n + d)
    ours = _grads(lambda r, s: symile_loss(r, s, negatives="n_squared", tile=tile), reps, 12.0)
    ref = _grads(lambda r, s: Symile("n_squared")(r, s), reps, 12.0)
    _same(ours, ref)


@pytest.mark.parametrize("n_mod", [2, 3, 4])
@pytest.mark.parametrize("n,tile", [(1, None), (10, 3), (48, 17)])
def test_n_equals_package_under_the_same_seed(n_mod, n, tile):
    """No generator: the global RNG is drawn in the package's order, so seeding matches it."""
    reps = _reps(n_mod, n, 16, seed=3 * n + n_mod)

    def ours(r, s):
        torch.manual_seed(1234)
        return symile_loss(r, s, negatives="n", tile=tile)

    def ref(r, s):
        torch.manual_seed(1234)
        return Symile("n")(r, s)

    _same(_grads(ours, reps, 8.0), _grads(ref, reps, 8.0))


def test_n_equals_package_given_its_recorded_permutations(monkeypatch):
    reps = _reps(3, 20, 16, seed=4)
    ref, drawn = _record_package_perms(monkeypatch, lambda: _grads(lambda r, s: Symile("n")(r, s), reps, 6.0))
    assert len(drawn) == 6
    perms = [drawn[0:2], drawn[2:4], drawn[4:6]]
    torch.manual_seed(999)  # the global RNG must not matter when permutations are given
    ours = _grads(lambda r, s: symile_loss(r, s, negatives="n", permutations=perms, tile=6), reps, 6.0)
    _same(ours, ref)


def test_n_with_a_generator_draws_in_the_package_order():
    reps = _reps(3, 15, 8, seed=5)
    ours = _grads(lambda r, s: symile_loss(r, s, generator=torch.Generator().manual_seed(7)), reps, 4.0)

    def ref(r, s):
        torch.manual_seed(7)  # a fresh generator seeded 7 draws what the global one seeded 7 draws
        return Symile("n")(r, s)

    _same(ours, _grads(ref, reps, 4.0))


# ----------------------------------------------------------------- brute force, smoothing


@pytest.mark.parametrize("n_mod,n,tile", [(2, 1, None), (2, 13, 4), (3, 11, 9), (4, 5, 11), (4, 7, None)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_n_squared_equals_brute_force(n_mod, n, tile, eps):
    reps = _reps(n_mod, n, 12, seed=n * n_mod)
    ours = _grads(
        lambda r, s: symile_loss(r, s, negatives="n_squared", tile=tile, label_smoothing=eps), reps, 10.0
    )
    _same(ours, _grads(lambda r, s: _dense_all_tuples(r, s, eps), reps, 10.0))


@pytest.mark.parametrize("n_mod", [2, 4])
def test_n_equals_brute_force_with_smoothing(n_mod):
    reps = _reps(n_mod, 17, 8, seed=n_mod)
    g = torch.Generator().manual_seed(0)
    perms = [[torch.randperm(17, generator=g) for _ in range(n_mod - 1)] for _ in range(n_mod)]
    ours = _grads(lambda r, s: symile_loss(r, s, permutations=perms, label_smoothing=0.1, tile=5), reps, 9.0)
    _same(ours, _grads(lambda r, s: _dense_shuffled(r, s, perms, 0.1), reps, 9.0))


# ----------------------------------------------------------------- masks


@pytest.mark.parametrize("n_mod,n", [(2, 12), (3, 16), (4, 8)])
def test_n_squared_mask_equals_dense_on_the_valid_subset(n_mod, n):
    reps, valid = _reps(n_mod, n, 16, seed=n), _mask(n, seed=n)
    ours = _grads(lambda r, s: symile_loss(r, s, negatives="n_squared", valid=valid, tile=7), reps, 7.0)
    ref = _grads(lambda r, s: _dense_all_tuples([x[valid] for x in r], s), reps, 7.0)
    _same(ours, ref)
    for grad in ours[1][:-1]:  # left-out samples get no gradient
        assert grad[~valid].abs().max() == 0


def test_n_mask_equals_package_on_the_valid_subset():
    reps, valid = _reps(3, 24, 16, seed=1), _mask(24, seed=2)

    def ours(r, s):
        torch.manual_seed(5)
        return symile_loss(r, s, negatives="n", valid=valid, tile=4)

    def ref(r, s):
        torch.manual_seed(5)  # permutations of the valid subset, as ours draws them
        return Symile("n")([x[valid] for x in r], s)

    _same(_grads(ours, reps, 5.0), _grads(ref, reps, 5.0))


def test_no_valid_sample_is_zero_with_graph():
    reps = [r.requires_grad_() for r in _reps(3, 5, 4)]
    for neg in ("n", "n_squared"):
        loss = symile_loss(reps, torch.tensor(3.0), negatives=neg, valid=torch.zeros(5, dtype=torch.bool))
        loss.backward()
        assert loss.item() == 0.0


def test_bad_arguments_are_refused():
    reps = _reps(3, 4, 8)
    with pytest.raises(ValueError, match="at least 2"):
        symile_loss(reps[:1], torch.tensor(1.0))
    with pytest.raises(ValueError, match="negatives"):
        symile_loss(reps, torch.tensor(1.0), negatives="all")
    with pytest.raises(ValueError, match="one shape"):
        symile_loss([reps[0], reps[1][:3]], torch.tensor(1.0))
    with pytest.raises(ValueError, match="only apply"):
        symile_loss(reps, torch.tensor(1.0), negatives="n_squared", generator=torch.Generator())
    with pytest.raises(ValueError, match="one entry per valid"):
        symile_loss(reps, torch.tensor(1.0), permutations=[[torch.arange(3)] * 2] * 3)


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_bf16_inputs_score_in_float32(negatives):
    reps = _reps(3, 20, 16, seed=8)
    low = [r.bfloat16().requires_grad_() for r in reps]
    torch.manual_seed(3)
    ours = symile_loss(low, torch.tensor(6.0), negatives=negatives, tile=50)
    torch.manual_seed(3)
    ref = symile_loss([r.detach().float() for r in low], torch.tensor(6.0), negatives=negatives, tile=50)
    _close(ours, ref)
    ours.backward()
    assert all(r.grad.dtype == torch.bfloat16 for r in low)


def test_mip_scores_is_the_multilinear_inner_product():
    a, b, c = _reps(3, 5, 6, seed=9)
    _close(mip_scores([a, b], c), torch.einsum("ik,ik,jk->ij", a, b, c))


# ----------------------------------------------------------------- distributed


def _global_batch(total, d, n_leading_invalid):
    reps, valid = _reps(3, total, d, seed=21), _mask(total, seed=22)
    valid[:n_leading_invalid] = False
    return reps, valid


def _from_numpy(pair):
    return torch.from_numpy(pair[0]), [torch.from_numpy(g) for g in pair[1]]


def _rank_losses(rank, world, sizes, d, n_leading_invalid):
    """Each rank's Symile losses and input gradients on its slice of one global batch."""
    reps, valid = _global_batch(sum(sizes), d, n_leading_invalid)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    results = {}
    for name in ("n_squared", "n_generator", "n_default"):

        def loss_fn(r, s, name=name):
            if name == "n_squared":
                return symile_loss(r, s, negatives="n_squared", valid=valid[lo:hi], tile=13)
            if name == "n_generator":
                gen = torch.Generator().manual_seed(77)
                return symile_loss(r, s, valid=valid[lo:hi], generator=gen, tile=4, label_smoothing=0.1)
            # ranks' global RNGs differ on purpose: rank 0's draw must decide
            torch.manual_seed(500 + rank)
            return symile_loss(r, s, valid=valid[lo:hi], tile=4)

        loss, grads = _grads(loss_fn, [x[lo:hi] for x in reps], 11.0)
        # numpy crosses the process boundary by pickling (tensors would go through shared fds
        # that vanish when the worker exits)
        results[name] = (loss.numpy(), [g.numpy() for g in grads])
    if world > 1:
        try:
            symile_loss(
                [x[lo:hi] for x in reps], torch.tensor(1.0), generator=torch.Generator().manual_seed(rank)
            )
            results["mismatch"] = "not refused"
        except ValueError as err:
            results["mismatch"] = str(err)
    return results


def _one_process_default_draw():
    """The generator ranks derive when none is given: seeded by rank 0's global RNG draw."""
    torch.manual_seed(500)
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))[0]))


@pytest.mark.parametrize("rank0_empty", [False, True])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(rank0_empty):
    sizes, d = (5, 11), 16
    # a rank whose samples all lack a modality must still join every collective
    n_invalid = sizes[0] if rank0_empty else 0
    single = {k: _from_numpy(v) for k, v in _rank_losses(0, 1, (sum(sizes),), d, n_invalid).items()}
    ranks = [
        {k: v if k == "mismatch" else _from_numpy(v) for k, v in r.items()}
        for r in run_ranks(2, _rank_losses, sizes, d, n_invalid)
    ]
    reps, valid = _global_batch(sum(sizes), d, n_invalid)
    n_default = _grads(
        lambda r, s: symile_loss(r, s, valid=valid, generator=_one_process_default_draw(), tile=4), reps, 11.0
    )
    for name, ref in [
        ("n_squared", single["n_squared"]),
        ("n_generator", single["n_generator"]),
        ("n_default", n_default),
    ]:
        _close(sum(r[name][0] for r in ranks) / 2, ref[0])
        # each rank's input gradient is world x its slice of the global one (averaged later)
        for m in range(3):
            _close(torch.cat([r[name][1][m] for r in ranks]) / 2, ref[1][m])
        _close(sum(r[name][1][3] for r in ranks) / 2, ref[1][3])
    assert all("differ between ranks" in r["mismatch"] for r in ranks)


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_one_host_read_per_call_on_a_full_batch(monkeypatch, negatives):
    """On meta tensors any read of device memory fails: the loss, forward and backward, reads
    the device only through valid_count_and_all (the sizes it needs), once."""
    import importlib

    symile_module = importlib.import_module("mmcontrast.losses.symile")
    reads = []

    def count_and_all(valid_all):
        reads.append(valid_all.shape[0])
        return valid_all.shape[0], True

    monkeypatch.setattr(symile_module, "valid_count_and_all", count_and_all)
    n = 6
    reps = [torch.randn(n, 8, device="meta", requires_grad=True) for _ in range(3)]
    scale = torch.ones((), device="meta", requires_grad=True)
    generator = torch.Generator().manual_seed(0) if negatives == "n" else None
    loss = symile_module.symile_loss(
        reps,
        scale,
        negatives=negatives,
        valid=torch.ones(n, dtype=torch.bool, device="meta"),
        generator=generator,
    )
    loss.backward()
    assert reads == [n] and all(r.grad.shape == r.shape for r in reps)
