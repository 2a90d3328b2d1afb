"""Evaluation: zero-shot classification and any-to-any retrieval, for training and for exports."""

from mmcontrast.eval.clip_benchmark import write_clip_benchmark_wds
from mmcontrast.eval.evaluate import evaluate
from mmcontrast.eval.run import eval_main, evaluate_export, evaluate_on_urls, format_metrics_table

__all__ = [
    "eval_main",
    "evaluate",
    "evaluate_export",
    "evaluate_on_urls",
    "format_metrics_table",
    "write_clip_benchmark_wds",
]
