"""``interleaf corpus ...``: build, inspect, convert and fetch images of interleaved corpora.

    interleaf corpus build [INPUT]... -o OUT [--config PIPELINE.yaml] [--workers N]
                           [--engine local|ray] [--format parquet|jsonl]
    interleaf corpus stats OUT
    interleaf corpus convert OUT --to text|pairs|mmc4 -o DEST
    interleaf corpus fetch-images OUT [--config PIPELINE.yaml] [--allow-private] [--local-root DIR]...
    interleaf corpus config [--config PIPELINE.yaml]

With no INPUT, ``build`` runs on the embedded sample (the libxslt HTML manual in a WARC).
This module stays cheap to import: the work happens in the handlers.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("corpus", help="build interleaved image-text corpora from web pages")
    sub = p.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND")

    b = sub.add_parser("build", help="WARC/HTML/corpus files -> filtered, deduplicated interleaved corpus")
    b.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="WARC files, HTML files/dirs, Parquet/JSONL (none: the embedded sample)",
    )
    b.add_argument("-o", "--output", required=True, help="output directory (resumes a killed run)")
    b.add_argument("--config", help="pipeline YAML (unknown keys are errors)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    b.add_argument("--engine", choices=("local", "ray"), default="local")
    b.add_argument("--format", choices=("parquet", "jsonl"), default=None, help="output format")
    b.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local instance)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)

    s = sub.add_parser("stats", help="per-stage statistics of a built corpus")
    s.add_argument("output", metavar="OUT")
    s.add_argument("--json", action="store_true", help="print stats.json as is")
    s.set_defaults(func=_stats)

    c = sub.add_parser("convert", help="degrade a corpus to pure text, image-text pairs or MMC4")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--to", required=True, choices=("text", "pairs", "mmc4"))
    c.add_argument("-o", "--dest", required=True, help="destination JSONL file")
    c.set_defaults(func=_convert)

    f = sub.add_parser("fetch-images", help="download images, add pixel metadata, apply pixel filters")
    f.add_argument("output", metavar="OUT")
    f.add_argument(
        "--allow-private", action="store_true", help="allow loopback/private addresses and local files"
    )
    f.add_argument(
        "--local-root",
        action="append",
        default=[],
        help="directory whose files may be read (replaces the config's fetch.local_roots)",
    )
    f.add_argument("--config", help="pipeline YAML (its 'fetch' section is used)")
    f.add_argument(
        "--from-sample",
        action="store_true",
        help="take images from the embedded sample only: offline, other URLs fail as not_in_sources",
    )
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_fetch)

    g = sub.add_parser("config", help="print the effective pipeline config (defaults + --config) as YAML")
    g.add_argument("--config", help="pipeline YAML to merge over the defaults")
    g.set_defaults(func=_config)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _build(args: argparse.Namespace) -> int:
    from interleaf.corpus import pipeline as P
    from interleaf.errors import InputError

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    overrides = {"write.format": args.format} if args.format else {}
    cfg = P.load_config(args.config, **overrides)
    inputs = args.inputs
    if not inputs:
        from interleaf.corpus.sample import sample_path

        inputs = [str(sample_path())]
    progress = not args.no_progress and sys.stderr.isatty()
    if args.engine == "ray":
        from interleaf.corpus.ray_engine import build_ray

        stats = build_ray(
            inputs, args.output, cfg, num_cpus=args.workers, address=args.ray_address, progress=progress
        )
    else:
        from interleaf.corpus.engine import build

        workers = args.workers or os.cpu_count() or 1
        stats = build(inputs, args.output, cfg, workers=workers, progress=progress)
    print(_summary_line(stats, args.output))
    return 0


def _config(args: argparse.Namespace) -> int:
    from interleaf.corpus import pipeline as P
    from interleaf.corpus.engine import DocProcessor

    cfg = P.load_config(args.config)
    DocProcessor(cfg)  # the stages build checks (filters, extractor, options): refused here too
    if cfg["filters"] is None:  # show the default filter list that None stands for
        from interleaf.corpus.filters import DEFAULT_FILTERS

        cfg["filters"] = list(DEFAULT_FILTERS)
    print(P.dump_config(cfg), end="")
    return 0


def _summary_line(stats: dict, out: str) -> str:
    return (
        f"{out}: {stats['records_in']} records -> {stats['docs_out']} documents "
        f"({stats['images_out']} images), {stats['excluded']} excluded, {stats['errors']} errors"
    )


def _stats(args: argparse.Namespace) -> int:
    import json

    from interleaf.corpus.engine import load_stats

    stats = load_stats(args.output)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(_summary_line(stats, args.output))
    print(f"{'stage':<28}{'docs in':>9}{'out':>9}{'excl':>7}{'err':>6}{'img in':>9}{'img out':>9}  reasons")
    for st in stats["stages"]:
        reasons = {**st["excluded_by_reason"], **st["errors_by_reason"], **st["images_removed_by_reason"]}
        top = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
        print(
            f"{st['name']:<28}{st['docs_in']:>9}{st['docs_out']:>9}{st['excluded']:>7}{st['errors']:>6}"
            f"{st['images_in']:>9}{st['images_out']:>9}  {top}"
        )
    print(f"accounting: records = out + excluded + errors: {'ok' if stats['balanced'] else 'BROKEN'}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from interleaf.corpus.engine import convert_corpus

    n_in, n_out = convert_corpus(args.output, args.to, args.dest)
    print(f"{args.dest}: {n_out} {args.to} records from {n_in} documents")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from interleaf.corpus import pipeline as P
    from interleaf.corpus.fetch import fetch_corpus

    # a flag overrides the config only when given; --local-root replaces the config's roots
    # before they are checked (a root of the machine that built the corpus is not refused here)
    overrides = {"fetch.local_roots": list(args.local_root)} if args.local_root else {}
    cfg = P.load_config(args.config, **overrides)["fetch"]
    if args.allow_private:
        cfg["allow_private"] = True
    sources = None
    if args.from_sample:
        from interleaf.corpus.sample import warc_image_source

        sources = warc_image_source()
    stats = fetch_corpus(
        args.output, cfg, progress=not args.no_progress and sys.stderr.isatty(), sources=sources
    )
    fetch = next(s for s in stats["stages"] if s["name"] == "fetch")
    removed = sum(fetch["images_removed_by_reason"].values())
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(fetch["images_removed_by_reason"].items()))
    print(
        f"{args.output}: {fetch['images_in']} images -> {fetch['images_out']} kept, {removed} removed"
        f"{f' ({reasons})' if reasons else ''}, {fetch['images_in_dropped_docs']} in "
        f"{fetch['excluded']} documents left without images; {stats['docs_out']} documents"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m interleaf.corpus.cli corpus ...``: the corpus commands without the other parts."""
    from interleaf.cli import run_handler

    parser = argparse.ArgumentParser(prog="interleaf")
    parser.add_argument("--debug", action="store_true")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_handler(lambda: args.func(args), args.debug)  # errors and a closed stdout as interleaf.cli


if __name__ == "__main__":
    sys.exit(main())
