"""Zero-shot after training the demo config in fp32, amp_bf16 and with train.compile, side by side.

    python benchmarks/precision_zero_shot.py [--steps 300] [--world DIR] [--variants fp32,amp_bf16,compile]

Each variant trains configs/demo.yaml for the same steps on the same demo world (written once, as
`make demo` writes it, unless --world names one) and reads the run's final in-training
evaluation. The table gives each benchmark's figure and its difference from fp32, in points;
issue 15 asks for amp_bf16 and compile within 2 points of fp32. The runs go one after another
(training is what is measured, not the wall clock).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("demo-classes", "demo-retrieval", "demo-composition")
VARIANTS = {
    "fp32": [],
    "amp_bf16": ["train.precision=amp_bf16"],
    "bf16": ["train.precision=bf16"],
    "compile": ["train.compile=true"],
}
SHOWN = ("demo-classes/image/top1", "demo-classes/audio/top1", "demo-composition/swap_att")


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmcontrast.cli", *args], check=True)


def train(world: Path, run: Path, steps: int, extra: list[str]) -> tuple[dict, float]:
    started = time.time()
    _cli(
        "train",
        str(REPO / "configs/demo.yaml"),
        f"run.dir={run}",
        "train.progress=false",
        f"data.train={world}/train-{{000000..000007}}.tar",
        f"eval.benchmarks=[{', '.join(str(world / 'benchmarks' / b) for b in BENCHMARKS)}]",
        f"train.steps={steps}",
        f"train.warmup={max(1, steps // 12)}",
        f"train.checkpoint_every={steps}",
        *extra,
    )
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return {
        k.removeprefix("val/"): v for k, v in final.items() if k.startswith("val/")
    }, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--world", type=Path, help="an existing demo world (default: write one)")
    parser.add_argument("--variants", default="fp32,amp_bf16,compile")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or variants[0] != "fp32":
        parser.error(f"variants come from {sorted(VARIANTS)}, fp32 first (got {args.variants})")

    with tempfile.TemporaryDirectory(prefix="precision_zero_shot_") as tmp:
        world = args.world
        if world is None:
            world = Path(tmp) / "world"
            _cli("data", "demo", "--out", str(world), "--train", "8000", "--val", "1000", "--seed", "0")
        results = {}
        for name in variants:
            results[name] = train(world, Path(tmp) / name, args.steps, VARIANTS[name])
            print(f"{name}: {args.steps} steps in {results[name][1]:.0f} s", flush=True)

    reference = results["fp32"][0]
    keys = [k for k in SHOWN if k in reference]
    print(f"\nconfigs/demo.yaml, {args.steps} steps; figures in %, difference from fp32 in points\n")
    print("| variant | " + " | ".join(keys) + " | train s |")
    print("|---" * (len(keys) + 2) + "|")
    worst = 0.0
    for name, (metrics, seconds) in results.items():
        cells = []
        for k in keys:
            diff = 100 * (metrics[k] - reference[k])
            if k.startswith("demo-classes"):
                worst = max(worst, -diff)
            cells.append(f"{100 * metrics[k]:.1f}" + ("" if name == "fp32" else f" ({diff:+.1f})"))
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    print(f"\nlargest zero-shot (demo-classes) drop against fp32: {worst:.1f} points (bound: 2)")


if __name__ == "__main__":
    main()
