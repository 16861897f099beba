"""interleaf: a toolkit for small, efficient multimodal LLMs of the InternVL family."""

from __future__ import annotations

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


__all__ = ["load", "__version__"]
