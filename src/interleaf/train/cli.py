"""Sub-commands ``interleaf demo``, ``interleaf train`` and ``interleaf adapt`` (cheap to import)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train a tiny InternVL from random weights on offline images, then quiz it (CPU, minutes)",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    demo.add_argument(
        "--image-size", type=int, default=224, help="tile size in px (default 224; 448 = full size)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    train = subparsers.add_parser(
        "train", help="train or fine-tune from a YAML config (InternVL data format)"
    )
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key",
    )
    train.set_defaults(func=_train)

    adapt = subparsers.add_parser(
        "adapt",
        help="domain adaptation: 'adapt convert KIND ...' to the conversation format, or 'adapt CONFIG.yaml'",
    )
    adapt.add_argument("args", nargs=argparse.REMAINDER, help="convert KIND ... | CONFIG.yaml [--set k=v]")
    adapt.set_defaults(func=_adapt)


def _demo(args: argparse.Namespace) -> int:
    from interleaf.train.demo import run_demo

    run_demo(out=args.out, steps=args.steps, image_size=args.image_size, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    import os

    from interleaf.train.config import load_config
    from interleaf.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(result["checkpoint"])
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from interleaf.train.adapt import main

    return main(args.args)
