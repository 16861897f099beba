"""User-facing errors.

Anything wrong with the user's input (a file, a field, a config key) is raised as an
``InterleafError`` with a one-line message naming the file or field. The CLI prints such
messages without a traceback and exits non-zero.
"""

from __future__ import annotations


class InterleafError(Exception):
    """A clear, one-line error about the user's input or environment."""


class ConfigError(InterleafError, ValueError):
    """A config with an unknown key, a wrong type or an impossible value."""


class CheckpointError(InterleafError):
    """A directory that is not a checkpoint, or weights that do not match the config."""


class InputError(InterleafError, ValueError):
    """A bad image, video, prompt or data record."""
