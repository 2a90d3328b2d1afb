"""What a checkpoint save blocks training for: DeepSpeed's own `engine.save_checkpoint` (the
anchor) against mmcontrast's `save_checkpoint`, which adds the rank files, the fsync and SHA-256
manifest, and (at the final step or train.weights_every) the full fp32 model.safetensors. The
trainer's periodic saves run with background=True: the fsync, checksums and `latest` finish in a
thread beside training, so what blocks is the time until the call returns (timed here; the
finishing is waited for outside the timer, before the next save).

    python benchmarks/checkpoint_cost.py                              # ViT-B-32, stage 0, fp32
    python benchmarks/checkpoint_cost.py --model demo --precision bf16 --rounds 5

One process (gloo), one engine, the same state saved again and again into fresh folders; rounds
interleave the saves. Printed: median seconds of each and the ratio to DeepSpeed's alone.
The page cache absorbs DeepSpeed's writes, while the manifest's fsync waits for the disk, so the
gap here is a lower bound of what a slower filesystem shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import model_config  # noqa: E402


def build(model: str, precision: str, stage: int, run_dir: Path):
    import torch

    from mmcontrast.config import config_from_dict
    from mmcontrast.model.multimodal import build_model
    from mmcontrast.train.engine import build_engine, init_distributed

    cfg = config_from_dict(
        {
            "run": {"dir": str(run_dir), "wandb": "disabled"},
            "data": {"train": "unused", "fields": {"image": "jpg", "text": "txt"}, "batch_size": 8},
            "model": {"clip": model_config(model)},
            "loss": {"terms": [{"name": "info_nce", "pairs": "all"}]},
            "train": {"steps": 10, "precision": precision, "zero_stage": stage},
            "eval": {"benchmarks": []},
        }
    )
    os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed()
    torch.manual_seed(0)
    return build_engine(build_model(cfg.model, cfg.modalities), cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "amp_bf16"])
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from mmcontrast.train.checkpoint import finish_checkpoints, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="mmcontrast-checkpoint-cost-") as tmp:
        work = Path(tmp)
        engine = build(args.model, args.precision, args.stage, work / "run")
        step = iter(range(1, 10**6))

        def deepspeed_alone():
            engine.save_checkpoint(str(work / "ds"), tag=f"step_{next(step):07d}", save_latest=False)

        def ours(full_weights: bool, background: bool = False):
            def save():
                save_checkpoint(
                    engine,
                    work / "run",
                    next(step),
                    {},
                    keep=1,
                    full_weights=full_weights,
                    background=background,
                )

            return save

        saves = {
            "DeepSpeed alone": deepspeed_alone,
            "mmcontrast periodic (no weights file, finishing in the background)": ours(False, True),
            "mmcontrast, no weights file, waiting for the checksums": ours(False),
            "mmcontrast final (with model.safetensors)": ours(True),
        }
        times = {name: [] for name in saves}
        for r in range(args.rounds):
            for name in saves if r % 2 == 0 else reversed(saves):
                start = time.perf_counter()
                saves[name]()
                times[name].append(time.perf_counter() - start)
                finish_checkpoints()  # outside the timer: the thread's share of the work
                shutil.rmtree(work / "ds", ignore_errors=True)  # one checkpoint on disk at a time
        size = sum(p.stat().st_size for p in (work / "run" / "checkpoints").rglob("*") if p.is_file())

    anchor = statistics.median(times["DeepSpeed alone"])
    print(f"\n{args.model}, stage {args.stage}, {args.precision}; last checkpoint {size / 2**30:.2f} GiB")
    print("| save | median s | rounds (s) | ratio to DeepSpeed alone |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / anchor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
