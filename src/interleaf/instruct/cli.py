"""``interleaf instruct``: caption and generate sub-commands (cheap to import: work happens in handlers)."""

from __future__ import annotations

import argparse
import json
import sys


def _endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=8, help="parallel requests")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries per request (timeouts, 429, 5xx)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=None, help="default: the endpoint's")
    p.add_argument("--limit", type=int, default=None, help="stop after N usable records")
    p.add_argument("--lang", choices=["en", "zh"], default="en")
    p.add_argument("--domain", default=None, help="domain of records without one (default image_description)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("instruct", help="instruction data (MMInstruct): caption, generate")
    sub = p.add_subparsers(dest="instruct_command", metavar="INSTRUCT_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    c = sub.add_parser("caption", help="detailed captions of images from a VLM endpoint (resumable)")
    c.add_argument("images", help="a folder of images, or JSONL records with 'image' (and 'ocr', 'domain')")
    c.add_argument("--vlm", required=True, help="openai:URL#MODEL (interleaf serve, vLLM, LMDeploy, ...)")
    c.add_argument("-o", "--out", required=True, help="output folder (rerun with the same to resume)")
    c.add_argument("--min-words", type=int, default=60, help="shorter captions are rejected")
    _endpoint_args(c)
    c.set_defaults(func=_caption)

    g = sub.add_parser("generate", help="captions -> checked instructions from an LLM endpoint (resumable)")
    g.add_argument("captions", help="JSONL / JSON list with 'image' and 'caption' (and 'domain', 'prior')")
    g.add_argument("--llm", required=True, help="openai:URL#MODEL")
    g.add_argument("-o", "--out", required=True, help="output folder (rerun with the same to resume)")
    g.add_argument(
        "--types",
        nargs="+",
        default=["judge", "choice", "long", "short"],
        choices=["judge", "choice", "long", "short"],
    )
    g.add_argument("--image-root", default=None, help="images' folder (default: the captions file's)")
    g.add_argument("--seeds", default=None, help="seed files: the official all_seed folder or <domain>.json")
    g.add_argument("--suffixes", default=None, help="answer-format suffixes (the official end_prompt.json)")
    g.add_argument(
        "--group-turns",
        action="store_true",
        help="one multi-turn sample per caption and type (multi-round QA)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for choosing seed questions and suffixes")
    g.add_argument("--min-long-words", type=int, default=25, help="long VQA answers at least this long")
    g.add_argument("--max-short-words", type=int, default=15, help="short VQA answers at most this long")
    g.add_argument(
        "--near-duplicate",
        type=float,
        default=0.8,
        help="question similarity (Jaccard) that counts as a repeat",
    )
    _endpoint_args(g)
    g.set_defaults(func=_generate)


def _check_numbers(args: argparse.Namespace) -> None:
    from interleaf.errors import InputError, check_minimums

    check_minimums(
        ("--limit", args.limit, 1),
        ("--concurrency", args.concurrency, 1),
        ("--retries", args.retries, 0),
        ("--max-tokens", args.max_tokens, 1),
        ("--min-words", getattr(args, "min_words", None), 0),
        ("--min-long-words", getattr(args, "min_long_words", None), 0),
        ("--max-short-words", getattr(args, "max_short_words", None), 1),
    )
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise InputError(f"--temperature must be a number >= 0, got {temperature}")
    if not args.timeout > 0:
        raise InputError(f"--timeout must be > 0, got {args.timeout}")
    near = getattr(args, "near_duplicate", None)
    if near is not None and not 0 < near <= 1:
        raise InputError(f"--near-duplicate must be in (0, 1], got {near}")


def _report(stats: dict, as_json: bool, line: str) -> None:
    if as_json:
        json.dump(stats, sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(line)


def _endpoint_settings(args: argparse.Namespace) -> dict:
    """The options ``_endpoint_args`` adds that both commands pass on as they are."""
    names = ("lang", "max_tokens", "temperature", "concurrency", "timeout", "retries", "limit")
    return {name: getattr(args, name) for name in names}


def _caption(args: argparse.Namespace) -> int:
    from interleaf.instruct.caption import caption_images

    _check_numbers(args)
    stats = caption_images(
        args.images,
        args.vlm,
        args.out,
        domain=args.domain,
        min_words=args.min_words,
        progress=not args.no_progress,
        **_endpoint_settings(args),
    )
    rejected = sum(stats["rejected"].values())
    _report(
        stats,
        args.json,
        f"wrote {stats['captions']} captions to {args.out}/captions.jsonl ({rejected} rejected)",
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from interleaf.instruct.engine import GenerateConfig, generate
    from interleaf.instruct.parse import Checks
    from interleaf.instruct.seeds import seed_bank

    _check_numbers(args)
    config = GenerateConfig(
        types=args.types,
        seed=args.seed,
        group_turns=args.group_turns,
        checks=Checks(args.min_long_words, args.max_short_words, args.near_duplicate),
        **_endpoint_settings(args),
    )
    stats = generate(
        args.captions,
        args.llm,
        args.out,
        config,
        bank=seed_bank(args.seeds, args.suffixes),
        image_root=args.image_root,
        domain=args.domain,
        progress=not args.no_progress,
    )
    n = stats["instructions"]["total"]
    by_type = ", ".join(f"{k} {v}" for k, v in stats["instructions"]["by_type"].items()) or "none"
    grouped = f" in {stats['instructions']['samples']} conversations" if args.group_turns else ""
    _report(stats, args.json, f"wrote {n} instructions ({by_type}){grouped} to {args.out}/instructions.jsonl")
    return 0
