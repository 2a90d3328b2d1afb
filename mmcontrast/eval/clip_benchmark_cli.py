"""`python -m mmcontrast.eval.clip_benchmark_cli eval ...`: clip_benchmark's own CLI, with our pins.

clip_benchmark 1.6.2's zero-shot accuracy() calls float() on a one-element 1-D NumPy array, which
NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"). This entry point swaps in
the same computation with .item() and hands the arguments to clip_benchmark unchanged, so its
numbers can sit beside ours in one environment.
"""

from __future__ import annotations

import sys


def topk_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy(): the fraction of rows whose target is among the top-k logits."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def main(argv: list[str] | None = None) -> None:
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = topk_accuracy
    sys.argv = ["clip_benchmark", *(sys.argv[1:] if argv is None else argv)]
    cli.main()


if __name__ == "__main__":
    main()
