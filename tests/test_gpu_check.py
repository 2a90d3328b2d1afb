"""benchmarks/gpu_check.sh's dry mode: the script a GPU machine runs first cannot rot on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_check_dry_mode_runs_its_steps_and_writes_its_figures(repo_root, tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [str(repo_root / "benchmarks/gpu_check.sh"), "--cpu", "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-dry" and report["tests"]["passed"], report["tests"]
    assert [run["precision"] for run in report["training"]] == ["bf16", "amp_bf16"]
    for run in report["training"]:
        assert run["returncode"] == 0 and run["finite"] and run["samples_per_s"] > 0, run
        assert run["seconds_to_first_step"] > 0
    assert "| demo | amp_bf16 | 2 |" in proc.stdout
    assert Path(report["tests"]["log"]).read_text().strip()  # the device tests' whole output
    speed = report["throughput"]
    assert speed["returncode"] == 0, speed
    assert speed["mmcontrast_samples_per_s"] > 0 and speed["open_clip_train_samples_per_s"] > 0
    assert "against open_clip_train" in proc.stdout
