"""`mmcontrast eval EXPORT_DIR --data URLS --out metrics.json`: evaluate an exported model on shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmcontrast.config import MODALITIES, DataConfig
from mmcontrast.eval.evaluate import evaluate


def default_class_names() -> list[str]:
    from mmcontrast.data.demo import CLASSES

    return list(CLASSES)


def export_data_config(model, urls: str, batch_size: int, workers: int) -> DataConfig:
    """Decode the eval shards the way the exported run was trained to read them."""
    meta = model.meta
    return DataConfig(
        val=urls,
        batch_size=batch_size,
        workers=workers,
        fields=dict(meta["data_fields"]),
        audio_sample_rate=model.audio_sample_rate,
        audio_seconds=model.audio_num_samples / model.audio_sample_rate,
    )


def evaluate_on_urls(
    model, urls: str, cfg, class_names: list[str] | None = None, workers: int | None = None
) -> dict:
    """Evaluate a training-time model (MultimodalModel, or a DeepSpeed engine's module) on val shards.

    Uses the run's data config (fields, audio length), cfg.eval.batch_size and cfg.eval.templates.
    """
    from mmcontrast.data.pipeline import make_loader

    loader = make_loader(
        urls,
        cfg.data,
        image_transform=model.val_transform,
        tokenizer=model.tokenizer,
        train=False,
        batch_size=cfg.eval.batch_size,
        workers=cfg.data.workers if workers is None else workers,
    )
    return evaluate(
        model,
        loader,
        cfg.eval.templates,
        list(class_names or default_class_names()),
        caption_strategy=cfg.eval.caption_strategy,
    )


def evaluate_export(
    export_dir,
    urls: str,
    out_json=None,
    batch_size: int = 256,
    workers: int = 0,
    templates: list[str] | None = None,
    class_names: list[str] | None = None,
    device: str = "cpu",
    caption_strategy: str = "greedy",
) -> dict:
    """Load an export, run zero-shot and retrieval on `urls` and (optionally) write the metrics JSON.

    Templates default to the ones the run was configured with (recorded in the export), class
    names to the 24 demo classes. A CoCa export also captions every image (caption_strategy).
    """
    from mmcontrast.data.pipeline import make_loader
    from mmcontrast.export import load_exported

    model = load_exported(export_dir, device=device)
    templates = list(templates or model.templates)
    class_names = list(class_names or default_class_names())
    loader = make_loader(
        urls,
        export_data_config(model, urls, batch_size, workers),
        image_transform=model.preprocess,
        tokenizer=model.tokenizer,
        train=False,
    )
    metrics = evaluate(model, loader, templates, class_names, caption_strategy=caption_strategy)
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
    """A readable plain-text table of `evaluate`'s metrics (accuracies and recalls in percent)."""
    lines = []
    order = {m: i for i, m in enumerate(MODALITIES)}
    single = sorted(
        {
            k.split("/")[1]
            for k in metrics
            if k.startswith("zeroshot/") and k.count("/") == 2 and "+" not in k
        },
        key=lambda m: order.get(m, 99),
    )
    rows = [(m, f"zeroshot/{m}", metrics.get(f"zeroshot/{m}/n", 0)) for m in single]
    tri = sorted({k.rsplit("/", 1)[0] for k in metrics if k.startswith("zeroshot/image+audio/")})
    n_tri = metrics.get("zeroshot/image/n", "")
    rows += [(f"{p.split('/')[1]} ({p.split('/')[2]})", p, n_tri) for p in tri]
    if rows:
        lines += ["zero-shot classification", f"  {'from':<20} {'top-1':>7} {'top-5':>7} {'n':>7}"]
        for label, prefix, n in rows:
            lines.append(
                f"  {label:<20} {_pct(metrics.get(f'{prefix}/top1')):>7} {_pct(metrics.get(f'{prefix}/top5')):>7} {n:>7}"
            )
    pairs = [k.split("/")[1] for k in metrics if k.startswith("retrieval/") and k.endswith("/n")]
    if pairs:
        if lines:
            lines.append("")
        lines += ["retrieval", f"  {'query->gallery':<28} {'R@1':>7} {'R@5':>7} {'n':>7}"]
        for pair in pairs:
            a, b = pair.split("-", 1)
            n = metrics[f"retrieval/{pair}/n"]
            for src, dst in ((a, b), (b, a)):
                prefix = f"retrieval/{src}->{dst}"
                lines.append(
                    f"  {src + '->' + dst:<28} {_pct(metrics.get(f'{prefix}/R@1')):>7} "
                    f"{_pct(metrics.get(f'{prefix}/R@5')):>7} {n:>7}"
                )
        for prefix in sorted({k.rsplit("/", 1)[0] for k in metrics if k.startswith("retrieval/text->(")}):
            label = f"{prefix.split('/')[1]} ({prefix.split('/')[2]})"
            lines.append(
                f"  {label:<28} {_pct(metrics.get(f'{prefix}/R@1')):>7} {_pct(metrics.get(f'{prefix}/R@5')):>7}"
            )
    categories = [k.split("/")[1] for k in metrics if k.startswith("composition/") and k.endswith("/n")]
    if categories:
        if lines:
            lines.append("")
        lines += [
            "composition: true caption vs hard negative (chance 50)",
            f"  {'category':<20} {'acc':>7} {'n':>7}",
        ]
        for category in categories:
            n = metrics[f"composition/{category}/n"]
            lines.append(f"  {category:<20} {_pct(metrics.get(f'composition/{category}')):>7} {n:>7}")
    kinds = [k for k in ("single_object", "two_object") if f"caption/{k}/n" in metrics]
    if kinds:
        if lines:
            lines.append("")
        lines += ["captions naming every object's colour and shape", f"  {'samples':<20} {'acc':>7} {'n':>7}"]
        for kind in kinds:
            acc = metrics.get(f"caption/{kind}")
            lines.append(f"  {kind.replace('_', '-'):<20} {_pct(acc):>7} {metrics[f'caption/{kind}/n']:>7}")
    return "\n".join(lines) if lines else "(no metrics)"


def eval_main(
    export_dir, data: str, out, batch_size: int = 256, workers: int = 0, caption_strategy: str = "greedy"
) -> dict:
    """Entry point for `mmcontrast eval`: evaluate, write `out` (JSON), print the table, return metrics."""
    metrics = evaluate_export(
        export_dir, data, out, batch_size=batch_size, workers=workers, caption_strategy=caption_strategy
    )
    print(format_metrics_table(metrics))
    print(f"metrics written to {out}")
    return metrics
