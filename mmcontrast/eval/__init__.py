"""Evaluation: tasks over benchmark folders (classification, retrieval, composition, captioning)."""

from mmcontrast.eval.benchmark import Benchmark, BenchmarkError, Decoder, read_benchmark
from mmcontrast.eval.run import eval_main, evaluate_export, format_metrics_table
from mmcontrast.eval.runner import evaluate_benchmarks

__all__ = [
    "Benchmark",
    "BenchmarkError",
    "Decoder",
    "eval_main",
    "evaluate_benchmarks",
    "evaluate_export",
    "format_metrics_table",
    "read_benchmark",
]
