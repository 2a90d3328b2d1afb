"""Training throughput of mmcontrast against open_clip_train, side by side: the same open_clip
architecture, the same image-text shards, batch, workers, precision, learning rate and steps,
run as `mmcontrast train` and as `python -m open_clip_train.main` (it ships in the
open_clip_torch wheel), in interleaved rounds (A B, then B A, ...).

    python benchmarks/train_throughput.py                                  # the demo-size model
    python benchmarks/train_throughput.py --model ViT-B-32 --batch 32 --steps 12
    python benchmarks/train_throughput.py --compile                        # torch.compile on both
    python benchmarks/train_throughput.py --compile-gain --model ViT-B-32  # ours compiled / not
    python benchmarks/train_throughput.py --model ViT-B-16 --batch 256 --precision amp_bf16  # a GPU

Printed per run: seconds from launch to the first logged step, and steady-state samples/s (the
median of the per-step figures each tool logs, after the first `--skip` steps); then the ratio
mmcontrast / open_clip_train per round and overall. Both log every step and clip gradients at
norm 1.0 (mmcontrast's default; open_clip_train's is off). The shards are the demo
world's pictures as JPEG at the model's image size with their captions; audio is not read.
On a GPU the table adds model FLOPs utilisation (fvcore-free: FLOPs counted by
torch.utils.flop_counter on one forward + backward of the batch, against --peak-tflops).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPEN_CLIP_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s")


def demo_clip_config() -> dict:
    from mmcontrast.config import load_config

    return load_config(REPO / "configs/demo.yaml", []).model.clip


def model_config(name: str) -> dict:
    import open_clip

    if name == "demo":
        return demo_clip_config()
    config = open_clip.get_model_config(name)
    if config is None:
        raise SystemExit(f"--model {name!r}: not 'demo' nor an open_clip model (open_clip.list_models())")
    return config


def make_jpeg_shards(out: Path, samples: int, size: int, per_shard: int = 256) -> str:
    """The demo world's pictures and captions, as `size` px JPEG image-text shards; the URL."""
    import webdataset as wds
    from PIL import Image

    from mmcontrast.data.demo import write_demo_world

    source = out / "demo"
    write_demo_world(source, n_train=samples, n_val=16, seed=0, samples_per_shard=per_shard)
    shards = sorted(source.glob("train-*.tar"))
    for i, shard in enumerate(shards):
        with wds.TarWriter(str(out / f"{i:06d}.tar")) as sink:
            for sample in wds.WebDataset(str(shard), shardshuffle=False):
                image = (
                    Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((size, size), Image.BICUBIC)
                )
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=90)
                sink.write({"__key__": sample["__key__"], "jpg": jpeg.getvalue(), "txt": sample["txt"]})
    return str(out / f"{{000000..{len(shards) - 1:06d}}}.tar")


def open_clip_model_dir(out: Path, clip_cfg: dict) -> str:
    """A `local-dir:` open_clip model folder holding only the config (random initialisation)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip_cfg, "preprocess_cfg": {}}))
    return f"local-dir:{out}"


def launch(command: list[str], cwd: Path, log: Path, first_record, env=None) -> tuple[float | None, str, int]:
    """Run to the end; seconds from launch until first_record() is true, the output, the code."""
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        first = None
        while proc.poll() is None:
            if first is None and first_record():
                first = time.perf_counter() - start
            time.sleep(0.1)
    if first is None:  # finished between two polls: the whole run is the bound
        first = time.perf_counter() - start
    return first, log.read_text(), proc.returncode


def run_mmcontrast(
    args, urls: str, clip_cfg, work: Path, tag: str, compile_towers: bool | None = None
) -> dict:
    import yaml

    compile_towers = args.compile if compile_towers is None else compile_towers

    run_dir = work / f"mmcontrast-{tag}"
    config = {
        "run": {"dir": str(run_dir), "seed": 0, "wandb": "disabled"},
        "data": {
            "train": urls,
            "fields": {"image": "jpg", "text": "txt"},
            "resampled": True,
            "batch_size": args.batch,
            "workers": args.workers,
            "shuffle_buffer": 256,
        },
        "model": {"clip": clip_cfg},
        "loss": {"terms": [{"name": "info_nce", "pairs": "all"}]},
        "train": {
            "steps": args.steps,
            "lr": 1e-4,
            "warmup": 2,
            "weight_decay": 0.2,
            "grad_clip": 1.0,
            "log_every": 1,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "progress": False,
            "precision": args.precision,
            "compile": compile_towers,
        },
        "eval": {"benchmarks": []},
    }
    config_file = work / f"mmcontrast-{tag}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    metrics = run_dir / "metrics.jsonl"
    first, output, code = launch(
        [sys.executable, "-m", "mmcontrast.cli", "train", str(config_file)],
        REPO,
        work / f"mmcontrast-{tag}.log",
        lambda: metrics.is_file() and metrics.stat().st_size > 0,
    )
    if code:
        raise RuntimeError(f"mmcontrast train failed:\n{output[-3000:]}")
    rates = [
        json.loads(line)["samples_per_s"] for line in metrics.read_text().splitlines() if '"loss"' in line
    ]
    return {"first_step_s": first, "rates": rates}


def run_open_clip(args, urls: str, model: str, work: Path, tag: str) -> dict:
    logs = work / f"open_clip-{tag}"
    command = (
        [
            sys.executable,
            str(REPO / "benchmarks/open_clip_train_compat.py"),  # webdataset 1.0's shard-end marker
            f"--model={model}",
            f"--train-data={urls}",
            "--dataset-type=webdataset",
            "--dataset-resampled",
            f"--train-num-samples={args.steps * args.batch}",
            f"--batch-size={args.batch}",
            f"--workers={args.workers}",
            "--epochs=1",
            "--lr=1e-4",
            "--warmup=2",
            "--wd=0.2",
            "--grad-clip-norm=1.0",  # mmcontrast clips at train.grad_clip (1.0); open_clip_train does not by default
            f"--precision={args.precision}",
            "--log-every-n-steps=1",
            "--save-frequency=0",
            "--zeroshot-frequency=0",
            "--val-frequency=0",
            "--seed=0",
            f"--logs={logs}",
            f"--name={tag}",
            "--report-to=",
        ]
        + (["--torchcompile"] if args.compile else [])
    )
    log = work / f"open_clip-{tag}.log"
    first, output, code = launch(command, REPO, log, lambda: "Train Epoch" in log.read_text())
    if code:
        raise RuntimeError(f"open_clip_train failed:\n{output[-3000:]}")
    return {"first_step_s": first, "rates": [float(r) for r in OPEN_CLIP_RATE.findall(output)]}


def steady(rates: list[float], skip: int) -> float:
    return statistics.median(rates[skip:] if len(rates) > skip else rates)


def model_flops(clip_cfg, batch: int) -> float:
    """FLOPs of one forward + backward of the image-text model on one batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmcontrast.model.multimodal import create_open_clip

    model = create_open_clip(clip_cfg)[0]
    size = clip_cfg["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size)
    text = torch.randint(
        0,
        clip_cfg["text_cfg"].get("vocab_size", 49408),
        (batch, clip_cfg["text_cfg"].get("context_length", 77)),
    )
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, scale = model(images, text)[:3]
        (image_features @ text_features.T * scale).sum().backward()
    return counter.get_total_flops()


def print_table(args, rounds: list[dict], ours_name: str, theirs_name: str, what: str) -> tuple[float, float]:
    """Prints the rounds and their mean; returns the two sides' mean steady samples/s."""
    print(
        f"\n{args.model}, batch {args.batch}, {args.workers} workers, {args.precision}, {what}, {args.steps} steps"
    )
    print(f"| round | {ours_name} samples/s | {theirs_name} samples/s | ratio | first step s |")
    print("|---|---|---|---|---|")
    for r, result in enumerate(rounds):
        ours, theirs = result["mmcontrast"], result["open_clip"]
        print(
            f"| {r} | {ours['steady']:.1f} | {theirs['steady']:.1f} | {ours['steady'] / theirs['steady']:.3f} | "
            f"{ours['first_step_s']:.1f} / {theirs['first_step_s']:.1f} |"
        )
    ours = statistics.mean(r["mmcontrast"]["steady"] for r in rounds)
    theirs = statistics.mean(r["open_clip"]["steady"] for r in rounds)
    print(f"| mean | {ours:.1f} | {theirs:.1f} | {ours / theirs:.3f} | |")
    return ours, theirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="demo", help="demo (configs/demo.yaml's CLIP) or an open_clip model name"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the steady state")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument(
        "--compile-gain",
        action="store_true",
        help="mmcontrast with train.compile against mmcontrast without it (open_clip_train not run)",
    )
    parser.add_argument("--samples", type=int, default=2048, help="samples in the shards")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, for MFU")
    parser.add_argument("--out", default="", help="also write the figures here as JSON")
    args = parser.parse_args()

    clip_cfg = model_config(args.model)
    size = clip_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    with tempfile.TemporaryDirectory(prefix="mmcontrast-throughput-") as tmp:
        work = Path(tmp)
        urls = make_jpeg_shards(work / "shards", args.samples, size)
        open_clip_model = (
            args.model if args.model != "demo" else open_clip_model_dir(work / "model", clip_cfg)
        )
        rounds = []
        for r in range(args.rounds):
            order = ["mmcontrast", "open_clip"] if r % 2 == 0 else ["open_clip", "mmcontrast"]
            result = {}
            for side in order:
                if side == "mmcontrast":
                    result[side] = run_mmcontrast(
                        args, urls, clip_cfg, work, f"r{r}", args.compile_gain or None
                    )
                elif args.compile_gain:  # the other side: mmcontrast uncompiled
                    result[side] = run_mmcontrast(args, urls, clip_cfg, work, f"r{r}-eager", False)
                else:
                    result[side] = run_open_clip(args, urls, open_clip_model, work, f"r{r}")
                result[side]["steady"] = steady(result[side]["rates"], args.skip)
            rounds.append(result)

    if args.compile_gain:
        ours, theirs = print_table(
            args, rounds, "mmcontrast compiled", "mmcontrast eager", "train.compile against eager"
        )
    else:
        what = "compiled" if args.compile else "eager"
        ours, theirs = print_table(args, rounds, "mmcontrast", "open_clip_train", what)
    figures = {
        "args": vars(args),
        "rounds": rounds,
        "mean_samples_per_s": {"mmcontrast": ours, "other": theirs},
    }
    if args.peak_tflops and not args.compile_gain:
        flops = model_flops(clip_cfg, args.batch)
        figures["flops_per_step"], figures["mfu"] = flops, {}
        for name, rate in (("mmcontrast", ours), ("open_clip_train", theirs)):
            mfu = flops * rate / args.batch / (args.peak_tflops * 1e12)
            figures["mfu"][name] = mfu
            print(f"MFU {name}: {100 * mfu:.1f}% ({flops / 1e12:.2f} TFLOP per step)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
