"""The ``interleaf`` command line: a thin dispatcher.

Each part of the toolkit registers its own sub-commands from ``interleaf.<part>.cli``
(a ``register(subparsers)`` function that must stay cheap to import: heavy imports go
inside the command handlers). Errors reach the user as one line and a non-zero exit
code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from interleaf.errors import InterleafError

# The packages that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "interleaf.model.cli",
    "interleaf.generation.cli",
    "interleaf.corpus.cli",
    "interleaf.eval.cli",
    "interleaf.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interleaf", description="Small, efficient multimodal LLMs of the InternVL family."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.debug:
            raise
        if isinstance(exc, InterleafError):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
