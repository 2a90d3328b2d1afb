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
