"""Peak memory and time of one training step's forward + backward on a global batch of B:
one pass over all B samples (the anchor) against GradCache with N micro-batches of B / N
(`train.accumulation: N`), same model, batch, objective and seed. The gradients agree (the
maximum relative difference is printed); the activation memory follows the micro-batch.

Each variant runs in its own subprocess so peaks do not mix. Peak memory is the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs once model and batch
exist) minus the resident set at that moment. Time is the best of --repeat passes. Ratios are
against the anchor of the same invocation.

    python benchmarks/grad_cache_memory.py                     # B=128, N in 1 (anchor), 4, 16
    python benchmarks/grad_cache_memory.py --batch 256 --micro 8 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss_memory import _reset_peak, _rss_kb  # noqa: E402  (same measuring method)

# A ViT-S/16-sized image tower at 128 px and a 6-layer text tower: big enough that activations,
# not weights, dominate a step.
CLIP = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 128, "patch_size": 16, "width": 384, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
}


def worker(pieces: int, batch: int, repeat: int) -> dict:
    import torch

    from mmcontrast.config import LossConfig, ModelConfig, TermConfig
    from mmcontrast.losses import Objective
    from mmcontrast.model.multimodal import build_model
    from mmcontrast.train.grad_cache import grad_cache_step
    from mmcontrast.train.loop import objective_loss

    torch.manual_seed(0)
    modalities = ["image", "text"]
    model = build_model(ModelConfig(clip=CLIP, audio=None), modalities).train()
    objective = Objective.from_config(LossConfig(terms=[TermConfig(name="info_nce")]), modalities)
    g = torch.Generator().manual_seed(1)
    data = {
        "__key__": [str(i) for i in range(batch)],
        "image": torch.randn(batch, 3, 128, 128, generator=g),
        "text": torch.randint(1, 49407, (batch, 32), generator=g),
        "present": {m: torch.ones(batch, dtype=torch.bool) for m in modalities},
    }

    def step():
        if pieces == 1:
            loss, _ = objective_loss(objective, model(data), data["present"])
            loss.backward()
            return loss
        loss, _ = grad_cache_step(
            model,
            lambda outputs: objective_loss(objective, outputs, data["present"]),
            data,
            pieces,
            lambda surrogate: surrogate.backward(),
            model=model,
        )
        return loss

    peak_mb, best = 0.0, float("inf")
    for _ in range(repeat):
        model.zero_grad(set_to_none=True)
        _reset_peak()
        base = _rss_kb("VmRSS")
        start = time.perf_counter()
        loss = step()
        best = min(best, time.perf_counter() - start)
        peak_mb = max(peak_mb, (_rss_kb("VmHWM") - base) / 1024)
    grads = {n: p.grad.flatten()[:4096].tolist() for n, p in model.named_parameters() if p.grad is not None}
    return {"pieces": pieces, "peak_mb": peak_mb, "time_s": best, "loss": loss.item(), "grads": grads}


def measure(pieces: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(pieces), str(args.batch), str(args.repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"pieces": pieces, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_relative_difference(got: dict, want: dict) -> float:
    worst = 0.0
    for name, ref in want.items():
        scale = max(abs(v) for v in ref) or 1.0
        worst = max(worst, max(abs(a - b) for a, b in zip(got[name], ref, strict=True)) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128, help="global batch B")
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 16], help="micro-batch counts N")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        pieces, batch, repeat = map(int, args.worker)
        print(json.dumps(worker(pieces, batch, repeat)))
        return

    header = f"{'variant':<28}{'peak MB':>10}{'time s':>9}{'loss':>10}{'mem ratio':>11}{'time ratio':>12}{'grad diff':>11}"
    print(f"global batch {args.batch}, ViT-S/16 at 128 px + 6-layer text tower, InfoNCE, float32")
    print(header)
    print("-" * len(header))
    anchor = measure(1, args)
    for pieces in [1, *args.micro]:
        row = anchor if pieces == 1 else measure(pieces, args)
        name = "one pass (anchor)" if pieces == 1 else f"GradCache {pieces} x {args.batch // pieces}"
        if "error" in row or "error" in anchor:
            print(f"{name:<28}  failed: {row.get('error') or anchor.get('error')}")
            continue
        mem = anchor["peak_mb"] / max(row["peak_mb"], 1e-3)
        slow = row["time_s"] / anchor["time_s"]
        diff = max_relative_difference(row["grads"], anchor["grads"])
        print(
            f"{name:<28}{row['peak_mb']:>10.1f}{row['time_s']:>9.2f}{row['loss']:>10.4f}"
            f"{mem:>10.2f}x{slow:>11.2f}x{diff:>11.1e}"
        )
    print("\nmem ratio = anchor peak / variant peak; time ratio = variant time / anchor time;")
    print("grad diff = max |g - g_anchor| / max |g_anchor| over each parameter's first 4096 entries")


if __name__ == "__main__":
    main()
