"""interleaf.generation: the KV-cache generation engine, ``ChatModel`` and ``interleaf chat``.

Exports are lazy so that ``interleaf.generation.cli`` stays cheap to import.
"""

from __future__ import annotations

from interleaf import lazy_exports

_EXPORTS = {
    "ChatModel": "interleaf.generation.chat",
    "TextStreamer": "interleaf.generation.chat",
    "GenerationConfig": "interleaf.generation.engine",
    "GenerationOutput": "interleaf.generation.engine",
    "Generator": "interleaf.generation.engine",
    "optimize_for_cpu": "interleaf.generation.engine",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
