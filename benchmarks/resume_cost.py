"""What a resume costs the data loader: seconds from building a train loader to its first batch,
fresh and resumed at 10% and 90% of an epoch, with the shard index (bounded resume) and without it
(a replay that reads every consumed shard again, decoding nothing). Ratios are against the fresh
start of the same round; rounds interleave the four cases.

    python benchmarks/resume_cost.py                          # 8000 demo samples, 2 workers
    python benchmarks/resume_cost.py --samples 40000 --rounds 3

The pipeline is the training one (make_loader, the demo's image and audio decoding); the model
is not built, so the times are the data path's alone. Shards sit in the page cache after the
first pass, which flatters the replay: on a cold disk or over a network it costs more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def first_batch_seconds(urls, cfg, tok, transform, position=None, index_dir=None) -> float:
    from mmcontrast.data.pipeline import make_loader

    start = time.perf_counter()
    loader = make_loader(
        urls,
        cfg,
        image_transform=transform,
        tokenizer=tok,
        train=True,
        position=position,
        index_dir=index_dir,
    )
    next(iter(loader))
    return time.perf_counter() - start


def main() -> None:
    import open_clip

    from mmcontrast.config import DataConfig
    from mmcontrast.data.demo import write_demo_world
    from mmcontrast.data.pipeline import make_loader

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="resume-cost-") as tmp:
        world = write_demo_world(
            Path(tmp) / "world", args.samples, 0, seed=0, samples_per_shard=args.shard_size
        )
        urls, index = world["urls"]["train"], str(Path(tmp) / "index")
        cfg = DataConfig(batch_size=args.batch_size, workers=args.workers, shuffle_buffer=args.shuffle_buffer)
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
        transform = open_clip.image_transform(64, is_train=False)

        # one pass to 90% of the epoch: the positions a checkpoint would hold, and the index
        # the training loader writes as it goes
        batches = args.samples // (args.batch_size * max(1, args.workers)) * max(1, args.workers)
        marks = {"10%": round(0.1 * batches), "90%": round(0.9 * batches)}
        loader = make_loader(urls, cfg, image_transform=transform, tokenizer=tok, train=True, index_dir=index)
        it, positions = iter(loader), {}
        for n in range(1, marks["90%"] + 1):
            next(it)
            for name, at in marks.items():
                if n == at:
                    positions[name] = loader.state_dict()
        del it, loader

        cases = {
            "fresh start": {},
            "resume at 10%, index": {"position": positions["10%"], "index_dir": index},
            "resume at 90%, index": {"position": positions["90%"], "index_dir": index},
            "resume at 90%, replay": {"position": positions["90%"]},
        }
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, kwargs in cases.items():
                times[name].append(first_batch_seconds(urls, cfg, tok, transform, **kwargs))

    print(
        f"{args.samples} samples in shards of {args.shard_size}, batch {args.batch_size}, "
        f"{args.workers} workers, shuffle buffer {args.shuffle_buffer}; median of {args.rounds} rounds"
    )
    fresh = statistics.median(times["fresh start"])
    print(f"{'case':<24} {'first batch s':>14} {'x fresh':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24} {median:>14.2f} {median / fresh:>8.2f}")


if __name__ == "__main__":
    main()
