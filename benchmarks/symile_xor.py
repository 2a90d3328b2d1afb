"""The synthetic XOR experiment of the Symile paper (Saporta et al., NeurIPS 2024, section 5.1).

a, b ~ Bernoulli(0.5)^5; per sample i ~ Bernoulli(p); c = a XOR b if i = 1 else c = a. Three
linear encoders (5 -> 16, L2-normalised) are trained with each objective; the zero-shot task is
to pick b among all 32 binary vectors given (a, c). With i = 1, b is a function of (a, c) but is
independent of a and of c separately, so only an objective that sees the three modalities
jointly can learn it. Bayes-optimal accuracy: guess b = a XOR c, right when i = 1 or, when i = 0,
by chance (1/32): (31 p + 1) / 32.

Set-up follows the authors' binary_xor run scripts: 10000 training and 5000 test samples, batch
1000, AdamW (lr 0.1, weight decay 0.01), learned logit scale initialised at exp(-0.3), Symile
with O(N) negatives. Default epochs are fewer than their 100 to stay within minutes on 2 CPU
cores (see --epochs). Scores at test time:
  Symile:        MIP(r_a, r_c, r_b)                      (mmcontrast.losses.symile)
  pairwise CLIP: r_a . r_b + r_c . r_b, trained on the sum of the three pairwise InfoNCE losses
  GRAM:          -Vol(r_b, r_a, r_c), trained with gram_loss's defaults (label smoothing 0.1)
                 and anchor b: its tuple-to-anchor direction is the test itself (rank the b's
                 for an (a, c) tuple); the volume is symmetric, so only the loss cares

    python benchmarks/symile_xor.py                  # p = 0, 0.2, ..., 1.0
    python benchmarks/symile_xor.py --p 1.0 --epochs 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from mmcontrast.losses.gram import gram_loss, gram_volume
from mmcontrast.losses.info_nce import info_nce
from mmcontrast.losses.symile import mip_scores, symile_loss

METHODS = ("symile", "clip", "gram")


def make_data(p: float, n: int, d_v: int, gen: torch.Generator):
    a = torch.randint(0, 2, (n, d_v), generator=gen)
    b = torch.randint(0, 2, (n, d_v), generator=gen)
    use_xor = torch.rand(n, 1, generator=gen) < p
    c = torch.where(use_xor, a ^ b, a)
    return a.float(), b.float(), c.float()


class Encoders(nn.Module):
    def __init__(self, d_v: int, d_r: int, logit_scale_init: float):
        super().__init__()
        self.f = nn.ModuleList(nn.Linear(d_v, d_r) for _ in range(3))
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale_init))

    def forward(self, a, b, c):
        return [F.normalize(f(x), dim=1) for f, x in zip(self.f, (a, b, c), strict=True)]


def loss_of(method: str, ra, rb, rc, scale):
    if method == "symile":
        return symile_loss([ra, rb, rc], scale, negatives="n")
    if method == "clip":
        return info_nce(ra, rb, scale) + info_nce(rb, rc, scale) + info_nce(ra, rc, scale)
    return gram_loss(rb, [ra, rc], 1.0 / scale)


@torch.no_grad()
def accuracy(method: str, model: Encoders, a, b, c) -> float:
    d_v = a.shape[1]
    # all 2^d_v binary vectors; candidate k has the bits of k, most significant first
    bits = 2 ** torch.arange(d_v - 1, -1, -1)
    candidates = ((torch.arange(2**d_v)[:, None] & bits) > 0).float()
    ra, _, rc = model(a, b, c)
    rb_cand = F.normalize(model.f[1](candidates), dim=1)
    if method == "symile":
        scores = mip_scores([ra, rc], rb_cand)
    elif method == "clip":
        scores = (ra + rc) @ rb_cand.T
    else:
        scores = -gram_volume(rb_cand, ra, rc).T
    truth = (b * bits).sum(1).long()
    return (scores.argmax(1) == truth).float().mean().item()


def run(method: str, p: float, args) -> float:
    gen = torch.Generator().manual_seed(args.seed)
    train = make_data(p, args.train_n, args.d_v, gen)
    test = make_data(p, args.test_n, args.d_v, gen)
    torch.manual_seed(args.seed)  # encoder init and Symile's negatives
    model = Encoders(args.d_v, args.d_r, args.logit_scale_init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    for _ in range(args.epochs):
        order = torch.randperm(args.train_n, generator=gen)
        for start in range(0, args.train_n - args.batch + 1, args.batch):  # drop_last
            idx = order[start : start + args.batch]
            ra, rb, rc = model(*(x[idx] for x in train))
            loss = loss_of(method, ra, rb, rc, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return accuracy(method, model, *test)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--train-n", dest="train_n", type=int, default=10000)
    parser.add_argument("--test-n", dest="test_n", type=int, default=5000)
    parser.add_argument("--d-v", dest="d_v", type=int, default=5)
    parser.add_argument("--d-r", dest="d_r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.01)
    parser.add_argument("--logit-scale-init", dest="logit_scale_init", type=float, default=-0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small ops: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"d_v={args.d_v} d_r={args.d_r} train={args.train_n} test={args.test_n} batch={args.batch} "
        f"epochs={args.epochs} lr={args.lr} seed={args.seed}"
    )
    header = f"{'p':>5}{'Bayes':>8}" + "".join(f"{m:>8}" for m in args.methods)
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for p in args.p:
        accs = [run(m, p, args) for m in args.methods]
        print(f"{p:>5.1f}{(31 * p + 1) / 32:>8.3f}" + "".join(f"{x:>8.3f}" for x in accs), flush=True)
    print(f"\naccuracy of picking b among 2^{args.d_v} candidates; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
