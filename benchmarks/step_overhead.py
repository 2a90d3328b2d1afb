"""The training step alone, mmcontrast against open_clip_train's, on one fixed batch: no data
pipeline, no logging. Both sides hold the same open_clip model (same initial weights) and batch.

    python benchmarks/step_overhead.py                    # the demo-size model, batch 64
    python benchmarks/step_overhead.py --model ViT-B-32 --batch 32 --steps 6
    python benchmarks/step_overhead.py --profile          # also: where each side's step goes

mmcontrast: `train_step` on its DeepSpeed engine (stage 0, fp32, gradient clipping 1.0, the
numeric guard and stop-flag agreement), as `mmcontrast train` runs it. open_clip_train: the body
of its `train_one_epoch` (ClipLoss, AdamW as its main.py builds it, clip_grad_norm_ 1.0, the
logit-scale clamp). Rounds alternate the order; printed: median seconds per step of each side and
the ratio open_clip / mmcontrast (above 1: mmcontrast is faster), and with --profile the phases
of each step and the operators taking the most self time on each side.
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


def mmcontrast_side(clip_cfg: dict, batch_size: int, device: torch.device):
    """(step(), model, phases(), batch) for mmcontrast's train_step on its engine."""
    from mmcontrast.config import config_from_dict
    from mmcontrast.losses import Objective
    from mmcontrast.model.multimodal import build_model
    from mmcontrast.train.engine import build_engine, init_distributed
    from mmcontrast.train.loop import objective_loss, to_device, train_step
    from mmcontrast.train.preemption import StopAgreement, StopRequest

    cfg = config_from_dict(
        {
            "run": {"dir": "/nonexistent", "wandb": "disabled"},
            "data": {"train": "unused", "fields": {"image": "jpg", "text": "txt"}, "batch_size": batch_size},
            "model": {"clip": clip_cfg},
            "loss": {"terms": [{"name": "info_nce", "pairs": "all"}]},
            "train": {"steps": 10**6, "lr": 1e-4, "warmup": 2, "weight_decay": 0.2, "grad_clip": 1.0},
            "eval": {"benchmarks": []},
        }
    )
    init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.modalities)
    objective = Objective.from_config(cfg.loss, cfg.modalities)
    engine = build_engine(model, cfg)
    agreement = StopAgreement(StopRequest(), engine.device)  # as the loop polls it every step
    size = clip_cfg["vision_cfg"]["image_size"]
    context = clip_cfg["text_cfg"].get("context_length", 77)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(batch_size, 3, size, size, generator=generator),
        "text": torch.randint(
            0, clip_cfg["text_cfg"].get("vocab_size", 49408), (batch_size, context), generator=generator
        ),
        "present": {m: torch.ones(batch_size, dtype=torch.bool) for m in ("image", "text")},
        "__key__": [str(i) for i in range(batch_size)],
    }
    on_device = to_device(batch, engine.device, torch.float32)

    def step():
        train_step(engine, objective, on_device, 1)
        agreement.poll()

    def phases() -> dict[str, float]:
        mark = PhaseClock(device)
        outputs = engine(on_device)
        mark("forward")
        loss, _ = objective_loss(objective, outputs, on_device["present"])
        mark("loss")
        engine.backward(loss)
        mark("backward")
        engine.step()
        agreement.poll()
        mark("optimizer")
        return mark.times

    return step, model.clip, phases, batch


def open_clip_side(clip_cfg: dict, weights: dict, batch: dict, device: torch.device):
    """(step(), phases()) for the body of open_clip_train's train_one_epoch, fp32."""
    from open_clip.loss import ClipLoss

    from mmcontrast.model.multimodal import create_open_clip

    model = create_open_clip(clip_cfg)[0].to(device)
    model.load_state_dict(weights)
    model.output_dict = True  # as open_clip_train creates it
    model.train()
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
    images = batch["image"].to(device)
    texts = batch["text"].to(device)

    def forward_loss():
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
        optimizer.zero_grad()
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


def top_operators(step, device, steps: int = 3, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip_cfg = model_config(args.model)
    ours, our_model, our_phases, batch = mmcontrast_side(clip_cfg, args.batch, device)
    theirs, their_phases = open_clip_side(clip_cfg, our_model.state_dict(), batch, device)
    sides = {"mmcontrast": ours, "open_clip_train": theirs}
    for step in sides.values():
        timed(step, args.warmup, device)

    medians = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in sides if r % 2 == 0 else reversed(sides):
            medians[name].append(statistics.median(timed(sides[name], args.steps, device)))
    print(f"\n{args.model}, batch {args.batch}, fp32, {device.type}: median s/step per round")
    print("| round | mmcontrast | open_clip_train | ratio (theirs / ours) |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        a, b = medians["mmcontrast"][r], medians["open_clip_train"][r]
        print(f"| {r} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    a, b = statistics.mean(medians["mmcontrast"]), statistics.mean(medians["open_clip_train"])
    print(f"| mean | {a:.4f} | {b:.4f} | {b / a:.3f} |")

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
