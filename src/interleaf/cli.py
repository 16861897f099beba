"""The ``interleaf`` command line: a thin dispatcher.

Each part of the toolkit registers its own sub-commands from ``interleaf.<part>.cli``
(a ``register(subparsers)`` function that must stay cheap to import: heavy imports go
inside the command handlers). Errors reach the user as one line and a non-zero exit
code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from interleaf.errors import InterleafError

# The packages that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "interleaf.model.cli",
    "interleaf.generation.cli",
    "interleaf.corpus.cli",
    "interleaf.instruct.cli",
    "interleaf.eval.cli",
    "interleaf.serve.cli",
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
    return run_handler(lambda: args.func(args), args.debug)


def run_handler(handler: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command ``handler`` as every interleaf entry point does; returns the exit status.

    Its result is the status (None: 0); a failure is one ``error:`` line and 1 (``debug``: the
    traceback); Ctrl-C is ``interrupted`` and 130. A reader that closed our stdout early
    (``interleaf info DIR | head -1``) ends the command quietly, as the Python docs' "Note on
    SIGPIPE" does, with 141 (128 + SIGPIPE), the status of a tool killed by SIGPIPE.
    """
    try:
        result = handler()
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's final flush
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI turns every failure into one line
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            # the rest of the output goes nowhere, so the exit flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        if debug:
            raise
        if isinstance(exc, InterleafError):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe without a reader: a BrokenPipeError from elsewhere (a socket, a
    worker's pipe) is a failure to report, not a closed output."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (tests, notebooks): no pipe
        return False
    try:
        import select

        poller = select.poll()
    except (ImportError, AttributeError):  # no poll (Windows): take it for stdout, as the docs do
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
