"""The launch scripts refuse a missing CONFIG argument with their usage line, before starting
anything."""

import subprocess

import pytest


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_missing_config_prints_usage_and_exits_2(repo_root, script):
    done = subprocess.run(
        ["bash", str(repo_root / "launch" / script)],
        cwd=repo_root,
        env={"PATH": "/usr/bin:/bin", "MMCONTRAST_DIR": str(repo_root)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: ") and f"{script} CONFIG" in done.stderr
    assert done.stdout == ""
