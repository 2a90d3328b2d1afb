"""`mmcontrast` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _cmd_data_demo(args) -> None:
    from mmcontrast.data.demo import write_demo_world

    manifest = write_demo_world(args.out, args.train, args.val, args.seed, samples_per_shard=args.shard_size)
    print(json.dumps({k: v for k, v in manifest.items() if k != "classes"}, indent=2))


def _cmd_data_benchmark(args) -> None:
    from mmcontrast.data.benchmark import benchmark_from_shards

    summary = benchmark_from_shards(
        args.data,
        args.out,
        args.task,
        classnames_file=args.classnames,
        templates_file=args.templates,
        label_field=args.label_field,
        caption_field=args.caption_field,
    )
    print(json.dumps(summary, indent=2))


def _cmd_data_index(args) -> None:
    from mmcontrast.data.pipeline import expand_sources
    from mmcontrast.data.shard_index import index_shards

    urls = [url for source in expand_sources(args.data) for url in source]
    print(json.dumps(index_shards(urls, args.out), indent=2))


def _cmd_negatives(args) -> None:
    from mmcontrast.data.negatives import write_negative_shards

    report = write_negative_shards(args.data, args.out, method=args.method, caption_field=args.caption_field)
    print(json.dumps(report, indent=2))


def _cmd_config(args) -> None:
    import yaml

    from mmcontrast.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False))


def _cmd_train(args) -> None:
    from mmcontrast.config import load_config

    cfg = load_config(args.config, args.overrides)  # refuses bad keys before any work
    from mmcontrast.train.loop import train

    result = train(cfg, resume="if_exists" if args.resume_if_exists else args.resume)
    if "eval" in result:
        from mmcontrast.eval.run import format_metrics_table

        print(format_metrics_table(result["eval"]))


def _cmd_export(args) -> None:
    from mmcontrast.export import export_run

    print(export_run(args.run_dir, args.out, tag=args.tag, ema=args.ema))


def _cmd_eval(args) -> None:
    from mmcontrast.eval.run import eval_main

    eval_main(
        args.export_dir,
        args.benchmark,
        args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        caption_strategy=args.caption_strategy,
    )


def _cmd_caption(args) -> None:
    from mmcontrast.eval.captions import caption_files

    for path, caption in caption_files(
        args.export_dir,
        args.images,
        args.strategy,
        seed=args.seed,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
    ):
        print(f"{path}\t{caption}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcontrast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write datasets").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="write the synthetic demo world as WebDataset shards")
    demo.add_argument("--out", required=True)
    demo.add_argument("--train", type=int, default=8000)
    demo.add_argument("--val", type=int, default=1000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shard-size", type=int, default=1000)
    demo.set_defaults(func=_cmd_data_demo)
    bench = data.add_parser(
        "benchmark", help="held-out shards -> a benchmark folder (clip_benchmark's wds layout, audio too)"
    )
    bench.add_argument("--data", required=True, help="held-out shard URLs")
    bench.add_argument("--out", required=True, help="benchmark folder (its name prefixes the metric keys)")
    bench.add_argument("--task", required=True, choices=["classification", "retrieval"])
    bench.add_argument("--label-field", default="cls", help="cls, or json:KEY (a class index or name)")
    bench.add_argument("--caption-field", default="txt", help="txt, or json:KEY (a caption or a list)")
    bench.add_argument("--classnames", help="classification: a file with one class name per line")
    bench.add_argument("--templates", help="classification: one template per line, {c} marks the class")
    bench.set_defaults(func=_cmd_data_benchmark)
    index = data.add_parser(
        "index", help="index local shards (each sample's byte range) for resumes that read no consumed shard"
    )
    index.add_argument("data", help="shard URLs, as data.train")
    index.add_argument("--out", required=True, help="index folder: give it to training as data.index_dir")
    index.set_defaults(func=_cmd_data_index)

    negs = sub.add_parser("negatives", help="copy shards, adding a neg.json list of hard-negative captions")
    negs.add_argument("--data", required=True, help="input shard URLs")
    negs.add_argument("--out", required=True, help="output folder (shard names are kept)")
    negs.add_argument("--method", default="rules", choices=["rules", "demo"], help="rules: any caption")
    negs.add_argument("--caption-field", default="txt")
    negs.set_defaults(func=_cmd_negatives)

    cfg = sub.add_parser("config", help="print the resolved config (validates it)")
    cfg.add_argument("config")
    cfg.add_argument("overrides", nargs="*", help="a.b=value")
    cfg.set_defaults(func=_cmd_config)

    train = sub.add_parser("train", help="train a run config")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="a.b=value")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="continue from the latest checkpoint, or start afresh when there is none (requeue scripts)",
    )
    train.set_defaults(func=_cmd_train)

    export = sub.add_parser("export", help="checkpoint -> open_clip local-dir folder (+ audio tower)")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    export.add_argument(
        "--ema", action="store_true", help="export the checkpoint's weight average (a run with train.ema)"
    )
    export.set_defaults(func=_cmd_export)

    ev = sub.add_parser("eval", help="an export's metrics on benchmark folders")
    ev.add_argument("export_dir")
    ev.add_argument(
        "--benchmark", action="append", required=True, help="a benchmark folder (repeat for several)"
    )
    ev.add_argument("--out", required=True, help="metrics JSON file")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--workers", type=int, default=2, help="decoding processes")
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ev.add_argument(
        "--caption-strategy",
        default="greedy",
        choices=["greedy", "top_k", "top_p", "beam", ""],
        help="CoCa exports: caption the images of captioning benchmarks this way ('' skips them)",
    )
    ev.set_defaults(func=_cmd_eval)

    cap = sub.add_parser("caption", help="caption images with an exported CoCa model (one line each)")
    cap.add_argument("export_dir")
    cap.add_argument("images", nargs="+")
    cap.add_argument("--strategy", default="greedy", choices=["greedy", "top_k", "top_p", "beam"])
    cap.add_argument("--seed", type=int, default=0, help="seeds the sampling strategies")
    cap.add_argument("--max-tokens", type=int, default=30, help="start and end tokens included")
    cap.add_argument(
        "--min-tokens",
        type=int,
        default=2,
        help="no end token before this many tokens (start token included)",
    )
    cap.add_argument("--temperature", type=float, default=1.0)
    cap.set_defaults(func=_cmd_caption)
    return parser


def main(argv=None) -> None:
    from mmcontrast.config import ConfigError
    from mmcontrast.eval.benchmark import BenchmarkError
    from mmcontrast.export import ExportError
    from mmcontrast.train.checkpoint import CheckpointWriteError
    from mmcontrast.train.guard import NonFiniteError
    from mmcontrast.train.resume import ResumeError

    # open_clip's factory logs every step to the root logger at INFO: keep the root at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mmcontrast").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"mmcontrast: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ResumeError as exc:
        print(f"mmcontrast: {exc}", file=sys.stderr)
        sys.exit(2)
    except (
        BenchmarkError,
        CheckpointWriteError,
        ExportError,
        NonFiniteError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"mmcontrast: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
