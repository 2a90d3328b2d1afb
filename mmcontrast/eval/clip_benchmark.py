"""Demo val data -> clip_benchmark's `wds/<name>` zero-shot classification layout.

clip_benchmark (datasets/builder.py, build_wds_dataset) reads, under --dataset_root:

    test/nshards.txt                          number of shards N
    test/0.tar .. test/{N-1}.tar              samples with an image (webp/png/jpg/jpeg) and "cls" (int)
    classnames.txt                            one class name per line, line i = class i
    zeroshot_classification_templates.txt     one template per line, "{c}" marks the class name
    dataset_type.txt                          "classification" (optional; the default)

so `clip_benchmark eval --dataset wds/<any> --dataset_root DIR --model local-dir:EXPORT` measures
the same single-object samples, class names and templates as `mmcontrast eval`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import webdataset as wds

from mmcontrast.eval.evaluate import single_object_label

IMAGE_FIELDS = "png;jpg;jpeg;webp"


def _val_urls(source) -> str | list[str]:
    path = Path(str(source))
    if not path.is_dir():
        return str(source)  # shard URL(s), brace patterns allowed
    manifest = path / "manifest.json"
    if manifest.is_file():
        shards = json.loads(manifest.read_text())["splits"]["val"]["shards"]
    else:
        shards = sorted(p.name for p in path.glob("val-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no val shards in {path}")
    return [str(path / s) for s in shards]


def _to_clip_benchmark_template(template: str) -> str:
    # clip_benchmark fills templates with str.format(c=classname).
    return template.replace("{}", "{c}")


def write_clip_benchmark_wds(
    val_urls_or_demo_dir,
    out_dir,
    image_field: str = IMAGE_FIELDS,
    class_names: list[str] | None = None,
    templates: list[str] | None = None,
    split: str = "test",
    max_count: int = 10_000,
) -> dict:
    """Write the single-object samples of the val shards for clip_benchmark; returns a summary.

    image_field: ";"-separated sample fields tried in order; the image bytes are copied unchanged,
    so both evaluations decode the same pixels. class_names default to the 24 demo classes,
    templates to EvalConfig's defaults; pass the run's own to compare like with like.
    """
    from mmcontrast.config import EvalConfig
    from mmcontrast.eval.run import default_class_names

    class_names = list(class_names or default_class_names())
    templates = list(templates or EvalConfig().templates)
    fields = [f.strip() for f in image_field.split(";") if f.strip()]
    out = Path(out_dir)
    split_dir = out / split
    if split_dir.exists():
        shutil.rmtree(split_dir)  # stale shards of an earlier, larger write would be read too
    split_dir.mkdir(parents=True)

    counts = {"written": 0, "skipped_not_single": 0, "skipped_no_image": 0}
    # Every shard, whatever torch.distributed says: this is an offline conversion, not a loader.
    dataset = wds.WebDataset(
        _val_urls(val_urls_or_demo_dir), shardshuffle=False, empty_check=False, nodesplitter=lambda urls: urls
    )
    sink = wds.ShardWriter(str(split_dir / "%d.tar"), maxcount=max_count, verbose=0)
    try:
        for sample in dataset:
            label = single_object_label(sample.get("json"), class_names) if "json" in sample else -1
            if label < 0:
                counts["skipped_not_single"] += 1
                continue
            field = next((f for f in fields if f in sample), None)
            if field is None:
                counts["skipped_no_image"] += 1
                continue
            sink.write({"__key__": sample["__key__"], field: sample[field], "cls": label})
            counts["written"] += 1
    finally:
        sink.close()
    if counts["written"] == 0:
        raise ValueError(
            f"no single-object samples with an image field ({image_field}) in {val_urls_or_demo_dir}"
        )
    n_shards = len(list(split_dir.glob("*.tar")))  # ShardWriter.close() drops its counters
    (split_dir / "nshards.txt").write_text(f"{n_shards}\n")
    (out / "classnames.txt").write_text("\n".join(class_names) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text(
        "\n".join(_to_clip_benchmark_template(t) for t in templates) + "\n"
    )
    (out / "dataset_type.txt").write_text("classification\n")
    return {**counts, "shards": n_shards, "dir": str(out)}
