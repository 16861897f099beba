"""interleaf.serve: an OpenAI-compatible chat server (``interleaf serve``) on the generation engine.

Exports are lazy so that ``interleaf.serve.cli`` stays cheap to import.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ChatServer": "interleaf.serve.server",
    "ServerOptions": "interleaf.serve.server",
    "make_server": "interleaf.serve.server",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'interleaf.serve' has no attribute {name!r}")
