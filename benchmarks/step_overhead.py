"""The training step alone, mmcontrast against open_clip_train's, on one fixed batch: no data
pipeline, no logging. Both sides hold the same open_clip model (same initial weights) and batch.

    python benchmarks/step_overhead.py                    # the demo-size model, batch 64
    python benchmarks/step_overhead.py --model ViT-B-32 --batch 32 --steps 6
    python benchmarks/step_overhead.py --profile          # also: where each side's step goes
    python benchmarks/step_overhead.py --model ViT-B-16 --batch 256 --precision amp_bf16 --profile  # a GPU
    python benchmarks/step_overhead.py --model ViT-B-32 --batch 32 --lock-image  # LiT, and unlocked beside

mmcontrast: what `mmcontrast train` does per step: the batch's copy to the device as its loader
hands it over (uint8 images, normalised there), the buffer snapshot, `train_step` on its
DeepSpeed engine (stage 0, gradient clipping 1.0, the numeric guard) and the stop-flag poll.
open_clip_train: the body of its `train_one_epoch`: the copy of the float images its loader makes,
ClipLoss, AdamW as its main.py builds it, clip_grad_norm_ 1.0, the logit-scale clamp; with
amp_bf16 the forward and loss under bf16 autocast, as its `get_autocast` gives. Rounds alternate the order; printed: median seconds per step of each side and
the ratio open_clip / mmcontrast (above 1: mmcontrast is faster), and with --profile the phases
of each step and the operators taking the most self time on each side. --lock-image locks the
image tower on both sides (model.lock.image: true; open_clip_train's --lock-image) and times
mmcontrast's unlocked step as a third side.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.train_throughput import model_config  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """mark(name) records the seconds since the previous mark (device work included)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.start = device, {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.times[name], self.start = now - self.start, now


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """As a DataLoader with pin_memory hands it over on a GPU machine."""
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def mmcontrast_side(
    clip_cfg: dict, batch_size: int, device: torch.device, precision: str, lock: dict | None = None
):
    """(step(), model, phases(), batch) for mmcontrast's train_step on its engine."""
    from mmcontrast.config import config_from_dict
    from mmcontrast.data.image import split_device_normalize
    from mmcontrast.losses import Objective
    from mmcontrast.model.multimodal import build_model
    from mmcontrast.train.engine import build_engine, init_distributed
    from mmcontrast.train.guard import BufferSnapshot
    from mmcontrast.train.loop import objective_loss, to_device, train_step
    from mmcontrast.train.preemption import StopAgreement, StopRequest

    cfg = config_from_dict(
        {
            "run": {"dir": "/nonexistent", "wandb": "disabled"},
            "data": {"train": "unused", "fields": {"image": "jpg", "text": "txt"}, "batch_size": batch_size},
            "model": {"clip": clip_cfg, "lock": lock or {}},
            "loss": {"terms": [{"name": "info_nce", "pairs": "all"}]},
            "train": {
                "steps": 10**6,
                "lr": 1e-4,
                "warmup": 2,
                "weight_decay": 0.2,
                "grad_clip": 1.0,
                "precision": precision,
            },
            "eval": {"benchmarks": []},
        }
    )
    init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.modalities)
    objective = Objective.from_config(cfg.loss, cfg.modalities)
    engine = build_engine(model, cfg)
    agreement = StopAgreement(StopRequest(), engine.device)  # as the loop polls it every step
    buffers = BufferSnapshot(engine.module)
    _, normalize = split_device_normalize(model.train_transform)
    size = clip_cfg["vision_cfg"]["image_size"]
    context = clip_cfg["text_cfg"].get("context_length", 77)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    loaded = {  # what the loader hands over
        "image": pinned(images),
        "text": pinned(
            torch.randint(
                0, clip_cfg["text_cfg"].get("vocab_size", 49408), (batch_size, context), generator=generator
            )
        ),
        "present": {m: pinned(torch.ones(batch_size, dtype=torch.bool)) for m in ("image", "text")},
        "__key__": [str(i) for i in range(batch_size)],
    }
    float_batch = {**loaded, "image": normalize(images)}  # the same pictures, for open_clip's side

    def step():
        on_device = to_device(loaded, engine.device, torch.float32, normalize)
        buffers.save()
        train_step(engine, objective, on_device, 1)
        agreement.poll()

    def phases() -> dict[str, float]:
        mark = PhaseClock(device)
        on_device = to_device(loaded, engine.device, torch.float32, normalize)
        buffers.save()
        mark("batch to device")
        outputs = engine(on_device)  # amp_bf16: the engine enters autocast itself
        mark("forward")
        loss, _ = objective_loss(objective, outputs, on_device["present"], equal_rows=True)
        mark("loss")
        engine.backward(loss)
        mark("backward")
        engine.step()
        agreement.poll()
        mark("optimizer")
        return mark.times

    return step, model.clip, phases, float_batch


def open_clip_side(
    clip_cfg: dict, weights: dict, batch: dict, device: torch.device, precision: str, lock_image: bool = False
):
    """(step(), phases()) for the body of open_clip_train's train_one_epoch."""
    import contextlib

    from open_clip.loss import ClipLoss

    from mmcontrast.model.multimodal import create_open_clip

    model = create_open_clip(clip_cfg)[0].to(device)
    model.load_state_dict(weights)
    model.output_dict = True  # as open_clip_train creates it
    model.train()
    if lock_image:  # open_clip_train's --lock-image (no unlocked groups, batch-norm statistics free)
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    named = list(model.named_parameters())

    def exclude(n, p):  # open_clip_train/main.py's weight-decay split
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.2},
        ],
        lr=1e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    loaded_images, loaded_texts = pinned(batch["image"]), pinned(batch["text"])

    def autocast():
        if precision == "amp_bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device():  # as train_one_epoch moves each batch
        return loaded_images.to(device, non_blocking=True), loaded_texts.to(device, non_blocking=True)

    def forward_loss():
        images, texts = to_device()
        with autocast():
            out = model(images, texts)
            losses = loss_fn(**out, output_dict=True)
        return sum(losses.values())

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    def step():
        optimizer.zero_grad()
        forward_loss().backward()
        update()

    def phases() -> dict[str, float]:
        mark = PhaseClock(device)
        images, texts = to_device()
        optimizer.zero_grad()
        mark("batch to device")
        with autocast():
            out = model(images, texts)
            mark("forward")
            total = sum(loss_fn(**out, output_dict=True).values())
        mark("loss")
        total.backward()
        mark("backward")
        update()
        mark("optimizer")
        return mark.times

    return step, phases


def timed(step, steps: int, device) -> list[float]:
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def top_operators(step, device, steps: int = 3, rows: int = 15) -> str:
    """The profiler's operator table; on a GPU headed by the device's busy time against the wall
    time per step (a gap between them: the device waited for the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    if device.type != "cuda":
        return averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    busy = sum(e.self_device_time_total for e in averages) / 1e6 / steps
    head = f"device busy {busy:.4f} s of {wall:.4f} s wall per step (profiled)\n"
    return head + averages.table(sort_by="self_device_time_total", row_limit=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--lock-image", action="store_true", help="LiT on both sides; unlocked mmcontrast beside"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip_cfg = model_config(args.model)
    lock = {"image": True} if args.lock_image else None
    ours, our_model, our_phases, batch = mmcontrast_side(clip_cfg, args.batch, device, args.precision, lock)
    theirs, their_phases = open_clip_side(
        clip_cfg, our_model.state_dict(), batch, device, args.precision, args.lock_image
    )
    sides = {"mmcontrast": ours, "open_clip_train": theirs}
    if args.lock_image:
        sides["mmcontrast unlocked"] = mmcontrast_side(clip_cfg, args.batch, device, args.precision)[0]
    for step in sides.values():
        timed(step, args.warmup, device)

    medians = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in sides if r % 2 == 0 else reversed(sides):
            medians[name].append(statistics.median(timed(sides[name], args.steps, device)))
    locked = ", image tower locked" if args.lock_image else ""
    print(
        f"\n{args.model}, batch {args.batch}, {args.precision}, {device.type}{locked}: median s/step per round"
    )
    others = [name for name in sides if name != "mmcontrast"]
    print("| round | " + " | ".join(sides) + " | " + " | ".join(f"{o} / mmcontrast" for o in others) + " |")
    print("|---" * (1 + len(sides) + len(others)) + "|")
    for r in [*range(args.rounds), "mean"]:
        cells = {n: statistics.mean(m) if r == "mean" else m[r] for n, m in medians.items()}
        times = " | ".join(f"{cells[n]:.4f}" for n in sides)
        ratios = " | ".join(f"{cells[o] / cells['mmcontrast']:.3f}" for o in others)
        print(f"| {r} | {times} | {ratios} |")

    if args.profile:
        print("\nphases, median s over the timed steps")
        split = {"mmcontrast": our_phases, "open_clip_train": their_phases}
        print("| phase | mmcontrast | open_clip_train |")
        print("|---|---|---|")
        runs = {name: [phases() for _ in range(args.steps)] for name, phases in split.items()}
        for phase in runs["mmcontrast"][0]:
            cells = [statistics.median(r[phase] for r in runs[name]) for name in split]
            print(f"| {phase} | {cells[0]:.4f} | {cells[1]:.4f} |")
        for name, step in sides.items():
            print(f"\n{name}: operators by self time over 3 steps\n{top_operators(step, device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
