"""interleaf.generation: the KV-cache generation engine, ``ChatModel`` and ``interleaf chat``.

Exports are lazy so that ``interleaf.generation.cli`` stays cheap to import.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ChatModel": "interleaf.generation.chat",
    "TextStreamer": "interleaf.generation.chat",
    "GenerationConfig": "interleaf.generation.engine",
    "GenerationOutput": "interleaf.generation.engine",
    "Generator": "interleaf.generation.engine",
    "optimize_for_cpu": "interleaf.generation.engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'interleaf.generation' has no attribute {name!r}")
