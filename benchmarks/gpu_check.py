"""The first thing to run on a machine with a GPU (benchmarks/gpu_check.sh calls this), well under
8 minutes on one H100/H200:

1. the device-sensitive tests on CUDA (DeepSpeed's engine on the GPU, NCCL where two GPUs exist):
   collective devices, fp32 master-weight export at every ZeRO stage, GradCache, the numeric guard;
2. the demo config trained for 50 steps in bf16 and in amp_bf16 on a fresh demo world: time to
   the first logged step, steady samples/s, the losses, peak GPU memory;
3. ViT-B-16 at batch 256 in amp_bf16 against open_clip_train on the same 224 px shards
   (benchmarks/train_throughput.py, one round): samples/s of each, the ratio, time to the first
   step and model FLOPs utilisation against the device's bf16 peak;
4. figures written to a JSON file (default benchmarks/gpu_check.json; the device tests' whole
   output beside it, *.tests.log) and printed as a markdown table that benchmarks/RESULTS.md
   takes over.

`--cpu` is a dry mode for CI: the same steps on a tiny world and model, a few steps each, so the
script cannot rot on machines without a GPU. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEVICE_TESTS = [
    "tests/test_collective_devices.py",
    "tests/test_master_weights.py",
    "tests/test_grad_cache.py",
    "tests/test_numeric_guard.py",
]
# the dry mode checks the plumbing with the quickest of them
DRY_TESTS = ["tests/test_collective_devices.py"]
PRECISIONS = ("bf16", "amp_bf16")
# dense bf16 TFLOP/s from the vendor's data sheets (SXM parts), for MFU; other devices get none
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
THROUGHPUT_GPU = ["--model", "ViT-B-16", "--batch", "256", "--precision", "amp_bf16", "--steps", "25"]
THROUGHPUT_GPU += ["--skip", "5", "--rounds", "1", "--workers", "8", "--samples", "4096"]
THROUGHPUT_DRY = ["--model", "demo", "--batch", "8", "--steps", "3", "--skip", "1", "--rounds", "1"]
THROUGHPUT_DRY += ["--workers", "0", "--samples", "32"]


def environment() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if torch.cuda.is_available():
        info |= {
            "device": torch.cuda.get_device_name(0),
            "devices": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }
    return info


def run_tests(tests: list[str], env: dict, log: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    log.write_text(proc.stdout + proc.stderr)  # the whole output: a failure is read there
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {
        "tests": tests,
        "passed": proc.returncode == 0,
        "summary": summary,
        "seconds": round(time.perf_counter() - start, 1),
        "failures": proc.stdout[-4000:] if proc.returncode else "",
        "log": str(log),
    }


def peak_tflops(device_name: str) -> float:
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), 0.0)


def throughput_run(arguments: list[str], peak: float, out: Path, env: dict) -> dict:
    """benchmarks/train_throughput.py with `arguments`: its figures, or its output's end."""
    command = [sys.executable, str(REPO / "benchmarks/train_throughput.py"), *arguments, "--out", str(out)]
    if peak:
        command += ["--peak-tflops", str(peak)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        return {
            "arguments": arguments,
            "returncode": proc.returncode,
            "error": (proc.stdout + proc.stderr)[-3000:],
        }
    figures = json.loads(out.read_text())
    (result,) = figures["rounds"]
    ours, theirs = (result[side]["steady"] for side in ("mmcontrast", "open_clip"))
    return {
        "arguments": arguments,
        "returncode": 0,
        "model": figures["args"]["model"],
        "batch": figures["args"]["batch"],
        "mmcontrast_samples_per_s": round(ours, 1),
        "open_clip_train_samples_per_s": round(theirs, 1),
        "ratio": round(ours / theirs, 3),
        "first_step_s": [round(result[side]["first_step_s"], 1) for side in ("mmcontrast", "open_clip")],
        "mfu": {name: round(value, 4) for name, value in figures.get("mfu", {}).items()},
    }


def train_run(world: Path, run_dir: Path, precision: str, steps: int, extra: list[str], env: dict) -> dict:
    """One training run: wall time to the first logged step, steady samples/s (median of the
    records after the first), losses, peak GPU memory."""
    command = [
        sys.executable,
        "-m",
        "mmcontrast.cli",
        "train",
        str(REPO / "configs/demo.yaml"),
        f"run.dir={run_dir}",
        f"data.train={world}/train-{{000000..000003}}.tar",
        "eval.benchmarks=[]",
        f"train.steps={steps}",
        f"train.precision={precision}",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "train.progress=false",
        *extra,
    ]
    from benchmarks.train_throughput import launch  # output to a file: a pipe left unread can fill and block

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    first_step, output, returncode = launch(
        command,
        REPO,
        run_dir.parent / f"{run_dir.name}.log",
        lambda: metrics.is_file() and metrics.stat().st_size > 0,
        env,
    )
    result = {"precision": precision, "steps": steps, "returncode": returncode}
    if returncode:
        return result | {"error": output[-3000:]}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    rates = [r["samples_per_s"] for r in records[1:]] or [records[0]["samples_per_s"]]
    return result | {
        "seconds_to_first_step": round(first_step, 1),
        "samples_per_s": round(statistics.median(rates), 1),
        "first_loss": round(records[0]["loss"], 4),
        "last_loss": round(records[-1]["loss"], 4),
        "finite": all(r["loss"] == r["loss"] for r in records),
        "peak_gpu_memory_gib": records[-1].get("peak_gpu_memory_gib"),
    }


def table(report: dict) -> str:
    rows = [
        "| run | precision | steps | s to first step | samples/s | loss first -> last | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["training"]:
        if run["returncode"]:
            rows.append(f"| demo | {run['precision']} | {run['steps']} | failed | | |")
            continue
        rows.append(
            f"| demo | {run['precision']} | {run['steps']} | {run['seconds_to_first_step']} | "
            f"{run['samples_per_s']} | {run['first_loss']} -> {run['last_loss']} | "
            f"{run['peak_gpu_memory_gib'] or '-'} |"
        )
    tests = report["tests"]
    speed = report["throughput"]
    if speed["returncode"]:
        against = "against open_clip_train: FAILED (see the JSON)"
    else:
        mfu = " / ".join(f"{100 * v:.1f}%" for v in speed["mfu"].values()) or "-"
        against = (
            f"{speed['model']} batch {speed['batch']} against open_clip_train: "
            f"{speed['mmcontrast_samples_per_s']} / {speed['open_clip_train_samples_per_s']} samples/s "
            f"(ratio {speed['ratio']}), first step {speed['first_step_s'][0]} / {speed['first_step_s'][1]} s, "
            f"MFU {mfu}"
        )
    return "\n".join(
        [
            f"gpu_check ({report['mode']}), {report['environment'].get('device', 'CPU')}, {report['environment']['date']}",
            f"device tests: {'passed' if tests['passed'] else 'FAILED'} ({tests['summary']}, {tests['seconds']} s)",
            "",
            *rows,
            "",
            against,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry mode without a GPU (tiny world and model)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/gpu_check.json"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (50; 2 with --cpu)")
    args = parser.parse_args()

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no GPU here; --cpu runs the dry mode", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    steps = args.steps or (2 if args.cpu else 50)
    report = {"mode": "cpu-dry" if args.cpu else "gpu", "environment": environment()}
    out = Path(args.out)
    report["tests"] = run_tests(DRY_TESTS if args.cpu else DEVICE_TESTS, env, out.with_suffix(".tests.log"))

    from mmcontrast.data.demo import write_demo_world
    from tests.test_train_e2e import TINY

    with tempfile.TemporaryDirectory(prefix="mmcontrast-gpu-check-") as tmp:
        world = Path(tmp) / "world"
        if args.cpu:
            write_demo_world(world, n_train=64, n_val=16, seed=0, samples_per_shard=16)
        else:
            write_demo_world(world, n_train=4 * 1024, n_val=64, seed=0, samples_per_shard=1024)
        extra = [*TINY, "train.log_every=1"] if args.cpu else []
        report["training"] = [
            train_run(world, Path(tmp) / f"run-{p}", p, steps, extra, env) for p in PRECISIONS
        ]
        report["throughput"] = throughput_run(
            THROUGHPUT_DRY if args.cpu else THROUGHPUT_GPU,
            peak_tflops(report["environment"].get("device", "")),
            Path(tmp) / "throughput.json",
            env,
        )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nfigures: {args.out}")
    ok = report["tests"]["passed"] and all(r["returncode"] == 0 and r["finite"] for r in report["training"])
    ok = ok and report["throughput"]["returncode"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
