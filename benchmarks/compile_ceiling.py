"""How much `torch.compile` can gain on a CLIP step at most: the share of matrix products.

    python benchmarks/compile_ceiling.py [--model ViT-B-32] [--batch 32]

Profiles forward + backward of the open_clip model (CLIP loss, eager, fp32) and splits the
operators' self time into matrix products and convolutions (mm, addmm, bmm, baddbmm, linear,
convolution: already one library call each, which inductor hands to the same library) and the
rest (norms, softmax, GELU, adds, copies: what inductor fuses). Even if compiling removed the rest
entirely, the step could be at most 1 / (matrix share) times faster; the printed bound is that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MATRIX_OPS = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "convolution", "_convolution")


def is_matrix_op(name: str) -> bool:
    base = name.removeprefix("aten::")
    return base in MATRIX_OPS or base.startswith(("mkldnn_convolution", "convolution_backward", "_mm"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps after one warm-up")
    args = parser.parse_args()

    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = open_clip.create_model(args.model)
    model.train()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch, 3, size, size)
    text = torch.randint(0, 49408, (args.batch, 77))
    loss_fn = ClipLoss()

    def step():
        image_features, text_features, scale = model(images, text)[:3]
        loss_fn(image_features, text_features, scale).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    matrix = rest = 0.0
    by_op: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        by_op[event.key] = event.self_cpu_time_total
        if is_matrix_op(event.key):
            matrix += event.self_cpu_time_total
        else:
            rest += event.self_cpu_time_total
    total = matrix + rest
    print(
        f"\n{args.model}, batch {args.batch}, fp32 eager, {args.steps} profiled steps (operators' self CPU time)"
    )
    print("| operator | share |")
    print("|---|---|")
    for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {name}{' (matrix)' if is_matrix_op(name) else ''} | {100 * t / total:.1f}% |")
    print(
        f"\nmatrix products and convolutions: {100 * matrix / total:.1f}% of the step; the rest {100 * rest / total:.1f}%"
    )
    print(f"upper bound on a compiled step's speed-up (the rest removed entirely): {total / matrix:.2f}x")


if __name__ == "__main__":
    main()
