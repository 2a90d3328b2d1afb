"""The shard pipeline alone, mmcontrast's `make_loader` against open_clip_train's
`get_wds_dataset`, on the same image-text JPEG shards with the same image transform and tokenizer,
in interleaved rounds at each worker count. No model step: only decode, augment, tokenise, batch,
and for mmcontrast the image normalisation its trainer does after the loader (on the device there;
here on the CPU, in the timed loop).

    python benchmarks/data_throughput.py                       # 224 px, 0/1/2 workers, batch 64
    python benchmarks/data_throughput.py --workers 0 2 --rounds 3 --out data.json

Printed per worker count and round: seconds to the first batch and samples/s over the next
`--batches` batches of each side, the ratio mmcontrast / open_clip_train, then a row of
mmcontrast alone on the demo world's image + text + audio shards (open_clip has no audio).
open_clip_train runs with benchmarks/open_clip_train_compat.py's fix (webdataset 1.0's shard-end
marker), resampled shards as with `--dataset-resampled`; mmcontrast with `data.resampled: true`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import make_jpeg_shards  # noqa: E402


def transforms(size: int):
    """open_clip's own train transform at `size` px and its tokenizer: both sides get these."""
    import open_clip

    transform = open_clip.image_transform(size, is_train=True)
    return transform, open_clip.get_tokenizer("ViT-B-32")


def measure(batches, count: int, batch_size: int, finish=lambda batch: batch) -> dict:
    """Seconds to the first batch, then samples/s over `count` more; `finish` is what the trainer
    still does to a batch before the model reads it."""
    start = time.perf_counter()
    finish(next(batches))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        finish(next(batches))
    return {"first_batch_s": first, "samples_per_s": count * batch_size / (time.perf_counter() - start)}


def ours(urls: str, fields: dict, workers: int, args, transform, tokenizer, index_dir: Path) -> dict:
    import torch

    from mmcontrast.config import DataConfig
    from mmcontrast.data.image import split_device_normalize
    from mmcontrast.data.pipeline import make_loader
    from mmcontrast.train.loop import to_device

    # as the trainer does: uint8 images from the workers, normalised where the model runs (here
    # the CPU, in this process, so its cost is counted)
    transform, normalize = split_device_normalize(transform)

    cfg = DataConfig(
        train=urls,
        resampled=True,
        shuffle_buffer=args.shuffle,
        batch_size=args.batch,
        workers=workers,
        fields=fields,
    )
    loader = make_loader(
        urls, cfg, image_transform=transform, tokenizer=tokenizer, train=True, index_dir=str(index_dir)
    )
    batches = iter(loader)
    try:
        return measure(
            batches,
            args.batches,
            args.batch,
            lambda b: to_device(b, torch.device("cpu"), torch.float32, normalize),
        )
    finally:
        del batches  # ends the worker processes before the other side starts


def theirs(urls: str, workers: int, args, transform, tokenizer) -> dict:
    import functools

    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    options = SimpleNamespace(
        train_data=urls,
        val_data=None,
        dataset_resampled=True,
        train_num_samples=(args.batches + 8) * args.batch * max(1, workers),
        train_data_upsampling_factors=None,
        batch_size=args.batch,
        workers=workers,
        world_size=1,
        seed=0,
    )
    info = oc_data.get_wds_dataset(options, transform, is_train=True, tokenizer=tokenizer)
    batches = iter(info.dataloader)
    try:
        return measure(batches, args.batches, args.batch)
    finally:
        del batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="JPEG and crop size in px")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="batches timed after the first")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048, help="samples in the shards")
    parser.add_argument("--shuffle", type=int, default=256, help="mmcontrast's sample shuffle buffer")
    parser.add_argument("--out", default="", help="also write the figures here as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker; workers=0 then runs on one core too
    transform, tokenizer = transforms(args.size)
    table = {}
    with tempfile.TemporaryDirectory(prefix="mmcontrast-data-throughput-") as tmp:
        work = Path(tmp)
        urls = make_jpeg_shards(work / "jpeg", args.samples, args.size)
        image_text = {"image": "jpg", "text": "txt"}
        for workers in args.workers:
            for r in range(args.rounds):
                sides = ["mmcontrast", "open_clip"] if r % 2 == 0 else ["open_clip", "mmcontrast"]
                result = {}
                for side in sides:
                    if side == "mmcontrast":
                        index = work / f"index-{workers}-{r}"
                        result[side] = ours(urls, image_text, workers, args, transform, tokenizer, index)
                    else:
                        result[side] = theirs(urls, workers, args, transform, tokenizer)
                table.setdefault(workers, []).append(result)
        # audio: the demo world's 64 px PNG, caption and 1 s FLAC per sample, ours only
        from mmcontrast.data.demo import write_demo_world

        write_demo_world(work / "world", n_train=args.samples, n_val=16, seed=0, samples_per_shard=256)
        world = f"{work}/world/train-{{000000..{args.samples // 256 - 1:06d}}}.tar"
        small, _ = transforms(64)
        fields = {"image": "png", "text": "txt", "audio": "flac"}
        audio = {
            w: ours(world, fields, w, args, small, tokenizer, work / f"index-a{w}") for w in args.workers
        }

    print(f"\n{args.size} px JPEG image-text shards, batch {args.batch}, {args.batches} batches timed")
    print("| workers | round | mmcontrast samples/s | open_clip_train samples/s | ratio | first batch s (ours / theirs) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for workers, rounds in table.items():
        for r, result in enumerate(rounds):
            a, b = result["mmcontrast"], result["open_clip"]
            print(
                f"| {workers} | {r} | {a['samples_per_s']:.1f} | {b['samples_per_s']:.1f} | "
                f"{a['samples_per_s'] / b['samples_per_s']:.3f} | {a['first_batch_s']:.2f} / {b['first_batch_s']:.2f} |"
            )
        a = statistics.mean(x["mmcontrast"]["samples_per_s"] for x in rounds)
        b = statistics.mean(x["open_clip"]["samples_per_s"] for x in rounds)
        print(f"| {workers} | mean | {a:.1f} | {b:.1f} | {a / b:.3f} | |")
    print("\nmmcontrast alone, demo world image (64 px PNG) + text + audio (1 s FLAC):")
    print("| workers | samples/s | first batch s |")
    print("|---|---|---|")
    for workers, result in audio.items():
        print(f"| {workers} | {result['samples_per_s']:.1f} | {result['first_batch_s']:.2f} |")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "image_text": table, "audio": audio}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
