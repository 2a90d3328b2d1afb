"""`mmcontrast eval EXPORT --benchmark DIR [...] --out metrics.json`: an export on benchmark folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmcontrast.eval.benchmark import Decoder, read_benchmark
from mmcontrast.eval.runner import evaluate_benchmarks


def caption_fn_for(model, strategy: str):
    """Caption generation for captioning benchmarks, or None (no CoCa decoder, or strategy '')."""
    if not strategy or not hasattr(model.clip, "text_decoder"):
        return None
    from mmcontrast.eval.captions import generate_captions

    return lambda images: generate_captions(model.clip, images, strategy)


def evaluate_export(
    export_dir,
    benchmarks: list,
    out_json=None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    caption_strategy: str = "greedy",
) -> dict:
    """Load an export and evaluate it on benchmark folders; optionally write the metrics JSON."""
    from mmcontrast.export import load_exported

    folders = [read_benchmark(b) for b in benchmarks]  # a broken folder fails before the model loads
    names = [b.name for b in folders]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark folder names must differ (they prefix the metric keys): {names}")
    model = load_exported(export_dir, device=device)
    decoder = Decoder(model.preprocess, model.audio_sample_rate, model.audio_num_samples)
    metrics = evaluate_benchmarks(
        model,
        folders,
        decoder,
        batch_size=batch_size,
        workers=workers,
        caption_fn=caption_fn_for(model, caption_strategy),
    )
    if out_json is not None:
        write_json_atomic(out_json, metrics)
    return metrics


def write_json_atomic(path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:6.2f}"


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table per benchmark: every fraction in percent, counts as they are."""
    by_bench: dict[str, dict] = {}
    for key, value in metrics.items():
        bench, _, rest = key.partition("/")
        by_bench.setdefault(bench, {})[rest] = value
    lines = []
    for bench, values in by_bench.items():
        lines.append(bench)
        for name, value in values.items():
            is_count = isinstance(value, int) or name.startswith(("skipped/", "nonfinite/", "encoded/"))
            text = f"{value:>8}" if is_count else f"{_pct(value):>8}"
            lines.append(f"  {name:<40} {text}")
        warnings = [n for n in values if n.startswith("nonfinite/")]
        if warnings:
            lines.append("  WARNING: non-finite embeddings counted as misses: " + ", ".join(warnings))
        lines.append("")
    return "\n".join(lines).rstrip() if lines else "(no metrics)"


def eval_main(
    export_dir,
    benchmarks: list,
    out,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    caption_strategy: str = "greedy",
) -> dict:
    """Entry point for `mmcontrast eval`: evaluate, write `out` (JSON), print the table, return metrics."""
    metrics = evaluate_export(
        export_dir,
        benchmarks,
        out,
        batch_size=batch_size,
        workers=workers,
        device=device,
        caption_strategy=caption_strategy,
    )
    print(format_metrics_table(metrics))
    print(f"metrics written to {out}")
    return metrics
