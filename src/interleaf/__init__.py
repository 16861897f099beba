"""interleaf: a toolkit for small, efficient multimodal LLMs of the InternVL family."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from interleaf.generation.chat import ChatModel


def load(path: str, device: str = "cpu", dtype: Any = None) -> ChatModel:
    """Load a checkpoint directory (InternVL-Chat or ``-hf`` layout) ready to chat.

    Returns an object with ``.model``, ``.tokenizer``, ``.chat(...)`` and ``.batch_chat(...)``.
    """
    from interleaf.generation.chat import ChatModel

    return ChatModel.from_pretrained(path, device=device, dtype=dtype)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package`` that imports ``exports[name]`` (a module path)
    on first use of ``name``: a package's command-line module then stays cheap to import (``interleaf
    --help`` loads no torch)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["load", "lazy_exports", "__version__"]
