import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Share DeepSpeed's JIT-built op across test processes and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (seconds to minutes); CI runs it too")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def tok():
    """open_clip's tokenizer (its vocabulary ships with the package), 16 tokens."""
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=16)


@pytest.fixture(scope="module")
def tf():
    """open_clip's 64 px evaluation transform."""
    import open_clip

    return open_clip.image_transform(64, is_train=False)


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory) -> Path:
    """`make demo`'s world (8000 train, 1000 val samples, seed 0), written once for the demo tests."""
    import subprocess
    import sys

    world = tmp_path_factory.mktemp("demo") / "world"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmcontrast.cli",
            "data",
            "demo",
            "--out",
            str(world),
            "--train",
            "8000",
            "--val",
            "1000",
            "--seed",
            "0",
        ],
        check=True,
        timeout=600,
    )
    return world
