"""Peak memory and time of CoCa's caption loss, forward + backward: the unchunked computation
(decoder states @ output projection -> b x L x V float32 logits -> open_clip's CoCaLoss caption
part) against mmcontrast's chunked caption term, on the same states, weights and labels.

Each variant runs in its own subprocess so peaks do not mix. Peak memory is the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs once the inputs exist)
minus the resident set at that moment: what the loss itself allocates, gradients included. Time
is the best of --repeat passes. Ratios are against the unchunked run of the same invocation.

    python benchmarks/caption_memory.py                  # b=64, L=76, V=49408, width 512 (coca_ViT-B-32)
    python benchmarks/caption_memory.py --pad 0.5        # half of every caption is padding
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

VARIANTS = ("unchunked (open_clip CoCaLoss)", "mmcontrast caption (chunked)")


def worker(variant: str, b: int, length: int, vocab: int, width: int, pad: float, chunk, repeat: int) -> dict:
    import torch
    from open_clip.loss import CoCaLoss

    from mmcontrast.losses.caption import caption_loss, caption_token_nll

    torch.manual_seed(0)
    hidden = torch.randn(b, length, width).requires_grad_()
    weight = (torch.randn(width, vocab) / width**0.5).requires_grad_()
    labels = torch.randint(1, vocab, (b, length))
    keep = int(round(length * (1 - pad)))
    labels[:, keep:] = 0  # padding at the end of every caption, as the tokenizer writes it
    coca = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=0)

    if variant == VARIANTS[0]:

        def run():
            return coca.caption_loss((hidden @ weight).permute(0, 2, 1), labels)
    else:

        def run():
            return caption_loss(*caption_token_nll(hidden, weight, labels, chunk=chunk))

    peak_mb, best, value = 0.0, float("inf"), None
    for _ in range(repeat):
        hidden.grad = weight.grad = None
        _reset_peak()
        base = _rss_kb("VmRSS")
        start = time.perf_counter()
        loss = run()
        loss.backward()
        best = min(best, time.perf_counter() - start)
        peak_mb = max(peak_mb, (_rss_kb("VmHWM") - base) / 1024)
        value = loss.item()
        del loss
    return {"variant": variant, "peak_mb": peak_mb, "time_s": best, "loss": value}


def measure(variant: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        *map(str, (args.b, args.length, args.vocab, args.width, args.pad, args.chunk or 0, args.repeat)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. out of memory: report, do not hide
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--b", type=int, default=64)
    parser.add_argument("--length", type=int, default=76, help="caption positions L")
    parser.add_argument("--vocab", type=int, default=49408)
    parser.add_argument("--width", type=int, default=512, help="decoder width")
    parser.add_argument("--pad", type=float, default=0.0, help="fraction of positions that are padding")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: ~2^23 logits)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, *nums = args.worker
        b, length, vocab, width = map(int, nums[:4])
        pad, chunk, repeat = float(nums[4]), int(nums[5]) or None, int(nums[6])
        print(json.dumps(worker(variant, b, length, vocab, width, pad, chunk, repeat)))
        return

    logits_gb = args.b * args.length * args.vocab * 4 / 1e9
    print(
        f"b={args.b} L={args.length} V={args.vocab} width={args.width} padding={args.pad:.0%}: "
        f"the full float32 logits alone are {logits_gb:.2f} GB"
    )
    header = f"{'variant':<34}{'peak MB':>10}{'time s':>9}{'loss':>10}{'mem ratio':>11}{'time ratio':>12}"
    print(header)
    print("-" * len(header))
    ref = measure(VARIANTS[0], args)
    new = measure(VARIANTS[1], args)
    for row in (ref, new):
        if "error" in row:
            print(f"{row['variant']:<34}  failed: {row['error']}")
            continue
        ratio = ""
        if row is new and "error" not in ref:
            ratio = (
                f"{ref['peak_mb'] / max(new['peak_mb'], 1e-3):>10.1f}x{new['time_s'] / ref['time_s']:>11.2f}x"
            )
        print(f"{row['variant']:<34}{row['peak_mb']:>10.1f}{row['time_s']:>9.2f}{row['loss']:>10.4f}{ratio}")
    print("\nmem ratio = unchunked peak / chunked peak; time ratio = chunked time / unchunked time")


if __name__ == "__main__":
    main()
