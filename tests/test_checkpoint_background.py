"""save_checkpoint(background=True): the training thread returns once the files are written; the
checksums, `latest` and the removal of old checkpoints finish beside it, on every rank, with no
collective. Until then `latest` names the previous checkpoint; a failure surfaces at the next wait."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.distributed import run_ranks


def _saves(rank, world, root: str):
    import torch
    import torch.distributed as dist

    from mmcontrast.config import load_config
    from mmcontrast.model.multimodal import build_model
    from mmcontrast.train import checkpoint
    from mmcontrast.train.engine import build_engine
    from tests.test_train_e2e import TINY

    os.environ["LOCAL_RANK"] = str(rank)
    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml", [*TINY, f"run.dir={root}"])
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model, cfg.modalities), cfg)
    ckpt = Path(root) / "checkpoints"
    seen = {}

    checkpoint.save_checkpoint(engine, root, 1, {}, keep=2)
    seen["after_sync_save"] = (ckpt / "latest").read_text()

    # hold the checksums back: the save has returned, the finishing has not
    gate, real_sha256 = threading.Event(), checkpoint._sha256
    checkpoint._sha256 = lambda path: gate.wait(60) and real_sha256(path)
    checkpoint.save_checkpoint(engine, root, 2, {}, keep=2, full_weights=False, background=True)
    seen["while_finishing"] = (ckpt / "latest").read_text()
    seen["manifest_while_finishing"] = (ckpt / "step_0000002" / checkpoint.MANIFEST).exists()
    dist.barrier()  # both ranks have looked before either finishes
    gate.set()
    checkpoint.finish_checkpoints()
    checkpoint._sha256 = real_sha256
    dist.barrier()
    seen["after_finish"] = (ckpt / "latest").read_text()
    seen["files"] = sorted(p.name for p in (ckpt / "step_0000002").iterdir())
    seen["damaged"] = checkpoint.damaged_files(ckpt / "step_0000002")  # collective

    checkpoint.save_checkpoint(engine, root, 3, {}, keep=2, full_weights=False, background=True)
    checkpoint.save_checkpoint(engine, root, 4, {}, keep=2)  # waits for step 3's finishing first
    seen["kept"] = sorted(p.name for p in ckpt.glob("step_*"))
    seen["after_rotation"] = (ckpt / "latest").read_text()

    def broken(path):
        raise OSError(5, "Input/output error")

    checkpoint._sha256 = broken
    checkpoint.save_checkpoint(engine, root, 5, {}, keep=2, full_weights=False, background=True)
    try:
        checkpoint.finish_checkpoints()
        seen["failure"] = None
    except checkpoint.CheckpointWriteError as exc:
        seen["failure"] = str(exc)
    checkpoint._sha256 = real_sha256
    dist.barrier()
    seen["after_failure"] = (ckpt / "latest").read_text()
    return seen


@pytest.mark.slow
def test_background_finishing_moves_latest_only_when_every_rank_checksummed(tmp_path):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).parents[1] / ".cache/torch_extensions"))
    for rank, seen in enumerate(run_ranks(2, _saves, str(tmp_path), timeout=300)):
        assert seen["after_sync_save"] == "step_0000001", rank
        assert seen["while_finishing"] == "step_0000001" and not seen["manifest_while_finishing"], rank
        assert seen["after_finish"] == "step_0000002", rank
        assert (
            "rank0.pt" in seen["files"] and "rank1.pt" in seen["files"] and "manifest.json" in seen["files"]
        )
        assert not [name for name in seen["files"] if name.startswith("manifest.part")], seen["files"]
        assert "model.safetensors" not in seen["files"]
        assert seen["damaged"] == [], seen["damaged"]
        assert seen["kept"] == ["step_0000003", "step_0000004"] and seen["after_rotation"] == "step_0000004"
        assert seen["failure"] and "Input/output error" in seen["failure"], seen["failure"]
        assert seen["after_failure"] == "step_0000004", rank  # never moved to the failed save
