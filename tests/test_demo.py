"""The headline claim: `make demo`'s steps on the full demo config reach >= 90% zero-shot."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(*args, timeout=1200):
    subprocess.run([sys.executable, "-m", "mmcontrast.cli", *args], check=True, timeout=timeout)


def test_demo_learns_image_and_audio_zero_shot(repo_root, tmp_path):
    world, run, export = tmp_path / "world", tmp_path / "run", tmp_path / "export"
    _cli("data", "demo", "--out", str(world), "--train", "8000", "--val", "1000", "--seed", "0")
    _cli(
        "train",
        str(repo_root / "configs/demo.yaml"),
        f"run.dir={run}",
        "train.progress=false",
        f"data.train={world}/train-{{000000..000007}}.tar",
        f"data.val={world}/val-000000.tar",
    )
    _cli("export", str(run), "--out", str(export))
    _cli("eval", str(export), "--data", f"{world}/val-000000.tar", "--out", str(tmp_path / "metrics.json"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["zeroshot/image/n"] >= 400 and metrics["zeroshot/audio/n"] >= 400
    assert metrics["zeroshot/image/top1"] >= 0.90
    assert metrics["zeroshot/audio/top1"] >= 0.90
    # the in-training final evaluation (on the training model) agrees with the export's
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val/zeroshot/image/top1"] == pytest.approx(metrics["zeroshot/image/top1"], abs=1e-6)
