"""Peak memory and time of the higher-order losses, forward + backward, against dense references.

  GRAM (3 modalities): mmcontrast gram_loss (closed-form 3 x 3 determinants, tiled; column tile
      --gram-tile) against the dense formulation of the GRAM reference code: the (B, B, 3, 3)
      Gram tensor, torch.linalg.det, sqrt|det| as volume, cross-entropy both ways with label
      smoothing 0.1. The reference computes one volume matrix per direction (local anchors x
      gathered tuples, gathered anchors x local tuples), in one process too; "1 pass" shares one
      matrix, a stricter baseline shown alongside.
  Symile "n_squared" (3 modalities): mmcontrast symile_loss (tiled product columns) against the
      `symile` package's Symile("n_squared"), which materialises B x B^2 logits per anchor.

Every configuration runs in its own subprocess; peak memory is the VmHWM high-water mark after a
reset through /proc/self/clear_refs, minus the resident set at that moment (the method and
helpers of benchmarks/loss_memory.py), after a tiny warm-up call. The package runs only while
one anchor's logits stay under --max-package-gib (its peak is several times that); beyond, its
need is extrapolated from the largest size it ran at (peak grows as B^3) and bounded below by
one anchor's logits.

    python benchmarks/higher_order_memory.py     # GRAM to B=2048; Symile to 512, then 2048 alone
                                                 # (~10 min on one core: n B^2 d work per anchor)
    python benchmarks/higher_order_memory.py --gram-sizes 512 --symile-sizes 128 256 --symile-big 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_memory import _reset_peak, _rss_kb  # noqa: E402  (same measuring method)

GIB = 2**30


def _dense_volume(anchor, v, w):
    """sqrt|det| of every (anchor_i, v_j, w_j) Gram matrix, built as one (B1, B2, 3, 3) tensor."""
    import torch

    b1, b2 = anchor.shape[0], v.shape[0]
    aa = (anchor * anchor).sum(1)[:, None].expand(b1, b2)
    av, aw = anchor @ v.T, anchor @ w.T
    vv = (v * v).sum(1)[None, :].expand(b1, b2)
    vw = (v * w).sum(1)[None, :].expand(b1, b2)
    ww = (w * w).sum(1)[None, :].expand(b1, b2)
    gram = torch.stack(
        [torch.stack([aa, av, aw], -1), torch.stack([av, vv, vw], -1), torch.stack([aw, vw, ww], -1)], -2
    )
    return torch.linalg.det(gram).abs().sqrt()


def _dense_gram_loss(anchor, v, w, temperature, passes, eps=0.1):
    """GRAM as its reference code computes it. passes=2: one volume matrix per direction (local
    anchors x gathered tuples, gathered anchors x local tuples), as the reference's training step
    does even in one process; passes=1: one shared matrix, a stricter baseline."""
    import torch
    import torch.nn.functional as F

    volume = _dense_volume(anchor, v, w)
    volume_t = _dense_volume(anchor, v, w).T if passes == 2 else volume.T
    labels = torch.arange(anchor.shape[0])
    return 0.5 * (
        F.cross_entropy(-volume / temperature, labels, label_smoothing=eps)
        + F.cross_entropy(-volume_t / temperature, labels, label_smoothing=eps)
    )


def worker(name: str, batch: int, dim: int, repeat: int, tile: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    reps = [F.normalize(torch.randn(batch, dim), dim=1).requires_grad_() for _ in range(3)]
    scale = torch.tensor(10.0, requires_grad=True)
    if name.startswith("gram dense det"):
        passes = 1 if name.endswith("1 pass") else 2

        def loss_fn(r, s):
            return _dense_gram_loss(r[0], r[1], r[2], 1.0 / s, passes)
    elif name == "mmcontrast gram":
        from mmcontrast.losses.gram import gram_loss

        def loss_fn(r, s):
            return gram_loss(r[0], r[1:], 1.0 / s, label_smoothing=0.1, tile=tile)
    elif name == "symile package":
        from symile import Symile

        loss_fn = Symile("n_squared")
    elif name == "mmcontrast symile":
        from mmcontrast.losses.symile import symile_loss

        def loss_fn(r, s):
            return symile_loss(r, s, negatives="n_squared", tile=tile)
    else:
        raise ValueError(name)

    # a tiny warm-up call: one-off library initialisation is not the loss's memory
    loss_fn([r[:4].detach().clone().requires_grad_() for r in reps], scale).backward()
    peak_mb, best, value = 0.0, float("inf"), None
    for _ in range(repeat):
        for t in (*reps, scale):
            t.grad = None
        _reset_peak()
        base = _rss_kb("VmRSS")
        start = time.perf_counter()
        loss = loss_fn(reps, scale)
        loss.backward()
        best = min(best, time.perf_counter() - start)
        peak_mb = max(peak_mb, (_rss_kb("VmHWM") - base) / 1024)
        value = loss.item()
        del loss
    return {"loss": name, "B": batch, "d": dim, "peak_mb": peak_mb, "time_s": best, "value": value}


def measure(name: str, batch: int, dim: int, args, tile: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, str(batch), str(dim), "--repeat", str(args.repeat)]
    cmd += ["--threads", str(args.threads)] + (["--tile", str(tile)] if tile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. killed for memory: report, do not hide
        error = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"loss": name, "B": batch, "d": dim, "error": error}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(row, ref) -> str:
    if ref is None or "error" in ref or "error" in row:
        return ""
    return f"{ref['peak_mb'] / max(row['peak_mb'], 1e-3):>10.1f}x{ref['time_s'] / row['time_s']:>10.1f}x"


def _print_row(row, ref=None, label=None):
    name = label or row["loss"]
    if "error" in row:
        print(f"{name:<24}{row['B']:>6}{row['d']:>5}  failed: {row['error']}", flush=True)
        return
    print(
        f"{name:<24}{row['B']:>6}{row['d']:>5}{row['value']:>10.4f}{row['peak_mb']:>10.1f}"
        f"{row['time_s']:>9.2f}{_ratios(row, ref)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gram-sizes", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--gram-dim", type=int, default=64)
    parser.add_argument(
        "--gram-tile",
        type=int,
        default=128,
        help="gram_loss column tile (its closed form keeps ~15 tiles alive; 0: the core's default)",
    )
    parser.add_argument("--symile-sizes", type=int, nargs="*", default=[128, 256, 384, 512])
    parser.add_argument("--symile-dim", type=int, default=64)
    parser.add_argument("--symile-big", type=int, default=2048, help="tiled-only Symile batch (0 skips)")
    parser.add_argument("--symile-tile", type=int, default=0, help="symile_loss column tile (0: its default)")
    parser.add_argument(
        "--max-package-gib",
        type=float,
        default=1.0,
        help="run the package only where one anchor's B x B^2 logits take at most this",
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker (same for all)")
    parser.add_argument("--worker", nargs=3, metavar=("LOSS", "B", "D"), help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        name, batch, dim = args.worker
        print(json.dumps(worker(name, int(batch), int(dim), args.repeat, args.tile)))
        return

    header = f"{'loss':<24}{'B':>6}{'d':>5}{'value':>10}{'peak MB':>10}{'time s':>9}{'mem ratio':>11}{'speedup':>11}"
    print(f"torch threads per worker: {args.threads}; gram tile: {args.gram_tile or 'default'}")
    print(header)
    print("-" * len(header))
    rows = []
    for batch in args.gram_sizes:
        ref = measure("gram dense det", batch, args.gram_dim, args)
        one = measure("gram dense det 1 pass", batch, args.gram_dim, args)
        new = measure("mmcontrast gram", batch, args.gram_dim, args, args.gram_tile)
        _print_row(ref)
        _print_row(one)
        _print_row(new, ref)
        _print_row(new, one, label="  (vs 1 pass)")
        rows += [ref, one, new]

    fitted, ran = [], []  # package peak / B^3 by size, to extrapolate its need where it is not run
    for batch in args.symile_sizes:
        ref = None
        if batch**3 * 4 / GIB <= args.max_package_gib:
            ref = measure("symile package", batch, args.symile_dim, args)
            _print_row(ref)
            rows.append(ref)
            if "error" not in ref:
                fitted.append(ref["peak_mb"] / batch**3)
                ran.append(batch)
        new = measure("mmcontrast symile", batch, args.symile_dim, args, args.symile_tile)
        _print_row(new, ref)
        rows.append(new)
    if args.symile_big:
        big = args.symile_big
        new = measure("mmcontrast symile", big, args.symile_dim, args, args.symile_tile)
        _print_row(new)
        rows.append(new)
        note = f"one anchor's B x B^2 float32 logits alone take {big**3 * 4 / GIB:.0f} GiB"
        if fitted:
            # from the largest size run, where the B^3 terms dominate the fixed costs
            need_gib = fitted[-1] * big**3 / 1024
            note += f"; its peak / B^3 at B={ran[-1]} extrapolates to {need_gib:.0f} GiB"
            rows.append(
                {
                    "loss": "symile package (extrapolated)",
                    "B": big,
                    "d": args.symile_dim,
                    "peak_mb": need_gib * 1024,
                }
            )
        print(f"{'symile package':<24}{big:>6}{args.symile_dim:>5}  not run: {note}")
    print(
        "\nvalue = the loss (reference and mmcontrast agree); peak MB = resident-set growth during"
        "\nforward + backward; mem ratio = reference peak / mmcontrast peak; speedup = reference time /"
        "\nmmcontrast time. gram dense det = the GRAM reference code's layout (a volume matrix per"
        "\ndirection); 1 pass = one shared volume matrix."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
