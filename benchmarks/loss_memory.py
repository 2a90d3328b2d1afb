"""Peak memory and time of loss forward+backward: mmcontrast's tiled losses vs open_clip's.

Every (loss, B, d) runs in its own subprocess so peaks do not mix. Peak memory is the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after the inputs exist)
minus the resident set at that moment, so it counts what the loss itself allocates. Time is the
best of --repeat forward+backward passes. Ratios are against open_clip in the same invocation.

    python benchmarks/loss_memory.py                       # B = 4096, 8192, 16384 at d=512, + 65536 x 128
    python benchmarks/loss_memory.py --sizes 1024 2048 --big 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

LOSSES = {
    "clip": ("open_clip ClipLoss", "mmcontrast info_nce"),
    "siglip": ("open_clip SigLipLoss", "mmcontrast siglip"),
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(name: str, batch: int, dim: int, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    a = F.normalize(torch.randn(batch, dim), dim=1).requires_grad_()
    b = F.normalize(torch.randn(batch, dim), dim=1).requires_grad_()
    scale = torch.tensor(20.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    if name == "open_clip ClipLoss":
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()

        def run():
            return loss_fn(a, b, scale)
    elif name == "open_clip SigLipLoss":
        from open_clip.loss import SigLipLoss

        loss_fn = SigLipLoss()

        def run():
            return loss_fn(a, b, scale, bias)
    elif name == "mmcontrast info_nce":
        from mmcontrast.losses import info_nce

        def run():
            return info_nce(a, b, scale)
    elif name == "mmcontrast siglip":
        from mmcontrast.losses import siglip

        def run():
            return siglip(a, b, scale, bias)
    else:
        raise ValueError(name)

    peak_mb, best = 0.0, float("inf")
    for _ in range(repeat):
        for t in (a, b, scale, bias):
            t.grad = None
        _reset_peak()
        base = _rss_kb("VmRSS")
        start = time.perf_counter()
        loss = run()
        loss.backward()
        best = min(best, time.perf_counter() - start)
        peak_mb = max(peak_mb, (_rss_kb("VmHWM") - base) / 1024)
        del loss
    return {"loss": name, "B": batch, "d": dim, "peak_mb": peak_mb, "time_s": best}


def measure(name: str, batch: int, dim: int, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, str(batch), str(dim), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. out of memory: report, do not hide
        return {"loss": name, "B": batch, "d": dim, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--big", type=int, default=65536, help="tiled-only batch size (0 skips)")
    parser.add_argument("--big-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--worker", nargs=3, metavar=("LOSS", "B", "D"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.worker:
        name, batch, dim = args.worker
        print(json.dumps(worker(name, int(batch), int(dim), args.repeat)))
        return

    rows = []
    header = f"{'loss':<22}{'B':>7}{'d':>5}{'peak MB':>10}{'time s':>9}{'mem ratio':>11}{'time ratio':>12}"
    print(header)
    print("-" * len(header))
    for kind in args.losses:
        reference, ours = LOSSES[kind]
        for batch in args.sizes:
            ref = measure(reference, batch, args.dim, args.repeat)
            new = measure(ours, batch, args.dim, args.repeat)
            for row in (ref, new):
                if "error" in row:
                    print(f"{row['loss']:<22}{batch:>7}{args.dim:>5}  failed: {row['error']}")
                    continue
                ratio = ""
                if row is new and "error" not in ref:
                    mem = ref["peak_mb"] / max(new["peak_mb"], 1e-3)
                    ratio = f"{mem:>10.1f}x{new['time_s'] / ref['time_s']:>11.2f}x"
                    row["memory_reduction"], row["time_ratio"] = mem, new["time_s"] / ref["time_s"]
                print(
                    f"{row['loss']:<22}{batch:>7}{args.dim:>5}{row['peak_mb']:>10.1f}{row['time_s']:>9.2f}{ratio}"
                )
            rows += [ref, new]
    if args.big:
        for kind in args.losses:
            row = measure(LOSSES[kind][1], args.big, args.big_dim, 1)
            rows.append(row)
            if "error" in row:
                print(f"{row['loss']:<22}{args.big:>7}{args.big_dim:>5}  failed: {row['error']}")
            else:
                print(
                    f"{row['loss']:<22}{args.big:>7}{args.big_dim:>5}{row['peak_mb']:>10.1f}{row['time_s']:>9.2f}"
                    "   (open_clip not run: its B x B logits alone would be "
                    f"{args.big**2 * 4 / 2**30:.0f} GiB)"
                )
    print("\nmem ratio = open_clip peak / mmcontrast peak; time ratio = mmcontrast time / open_clip time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
