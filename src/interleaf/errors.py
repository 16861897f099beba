"""User-facing errors.

Anything wrong with the user's input (a file, a field, a config key) is raised as an
``InterleafError`` with a one-line message naming the file or field. The CLI prints such
messages without a traceback and exits non-zero.
"""

from __future__ import annotations

import math
from typing import Any


class InterleafError(Exception):
    """A clear, one-line error about the user's input or environment."""


class ConfigError(InterleafError, ValueError):
    """A config with an unknown key, a wrong type or an impossible value."""


class CheckpointError(InterleafError):
    """A directory that is not a checkpoint, or weights that do not match the config."""


class InputError(InterleafError, ValueError):
    """A bad image, video, prompt or data record."""


def is_number(value: Any) -> bool:
    """A finite int or float, for checking a field read from JSON: a bool is an int in Python, and
    json reads NaN and Infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe(exc: BaseException) -> str:
    """``ExcType: first line of exc`` (just ``ExcType`` when it has no message), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}{f': {lines[0]}' if lines else ''}"


def cannot_read(path: object, exc: BaseException) -> InputError:
    """The one-line ``InputError`` '``path``: cannot read (``ExcType``: first line of ``exc``)' for a
    file that could not be opened, decoded or parsed; raise it ``from exc`` or ``from None``."""
    return InputError(f"{path}: cannot read ({describe(exc)})")


def check_minimums(*checks: tuple[str, float | None, float]) -> None:
    """Command-line numbers: each ``(flag, value, lowest)`` with a value (None: not given) below its
    lowest allowed value is one ``InputError`` naming the flag."""
    for flag, value, low in checks:
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
