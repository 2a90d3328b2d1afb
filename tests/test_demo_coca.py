"""`make demo-coca`'s steps: CoCa (+ audio) on the demo world learns to caption.

CI runs the first 400 of the config's 1200 steps (a third of the time) with bounds that an untrained
or broken captioner cannot meet; `make demo-coca` runs the whole schedule."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(*args, timeout=1500, capture=False):
    proc = subprocess.run(
        [sys.executable, "-m", "mmcontrast.cli", *args],
        check=True,
        timeout=timeout,
        capture_output=capture,
        text=True,
    )
    return proc.stdout


def test_demo_coca_captions_name_colour_and_shape(repo_root, demo_world, tmp_path):
    world, run, export = demo_world, tmp_path / "run", tmp_path / "export"
    _cli(
        "train",
        str(repo_root / "configs/demo-coca.yaml"),
        f"run.dir={run}",
        "train.progress=false",
        f"data.train={world}/train-{{000000..000007}}.tar",
        f"eval.benchmarks=[{world}/benchmarks/demo-classes, {world}/benchmarks/demo-captions]",
        "train.steps=400",
        "train.checkpoint_every=200",
    )
    _cli("export", str(run), "--out", str(export))
    benchmarks = [f"--benchmark={world}/benchmarks/{name}" for name in ("demo-classes", "demo-captions")]
    _cli("eval", str(export), *benchmarks, "--out", str(tmp_path / "metrics.json"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    captions = {
        k.removeprefix("demo-captions/"): v for k, v in metrics.items() if k.startswith("demo-captions/")
    }
    assert captions["single_object/n"] >= 400 and captions["two_object/n"] >= 400
    # chance: 1/24 for the colour and shape of a single object
    assert captions["single_object"] >= 0.40
    assert metrics["demo-classes/image/top1"] >= 0.40
    # the training-time evaluation (MultimodalModel, same greedy captions) agrees with the export's
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val/demo-captions/single_object"] == pytest.approx(captions["single_object"], abs=1e-6)

    # a few val images captioned through the CLI name their objects like the eval says
    import webdataset as wds

    samples = list(wds.WebDataset(f"{world}/val-000000.tar", shardshuffle=False).slice(40))
    paths, metas = [], []
    for i, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        if len(meta["objects"]) == 1:
            path = tmp_path / f"val{i}.png"
            path.write_bytes(sample["png"])
            paths.append(str(path))
            metas.append(meta)
    lines = _cli("caption", str(export), *paths, capture=True).strip().splitlines()
    from mmcontrast.data.demo import CLASSES
    from mmcontrast.eval.tasks import mentioned_classes

    hits = sum(
        mentioned_classes(line.split("\t", 1)[1], list(CLASSES))
        == {f"{o['color']} {o['shape']}": 1 for o in m["objects"]}
        for line, m in zip(lines, metas, strict=True)
    )
    assert hits >= 0.3 * len(paths)
