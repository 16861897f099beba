"""interleaf.serve: an OpenAI-compatible chat server (``interleaf serve``) on the generation engine.

Exports are lazy so that ``interleaf.serve.cli`` stays cheap to import.
"""

from __future__ import annotations

from interleaf import lazy_exports

_EXPORTS = {
    "ChatServer": "interleaf.serve.server",
    "ServerOptions": "interleaf.serve.protocol",
    "make_server": "interleaf.serve.server",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
