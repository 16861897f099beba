"""Prompt building: image placeholders, multi-image / video prefixes and image-token expansion.

A user question may contain ``<image>`` placeholders, one per image, in order. When images are given
without any placeholder (and there is no history) one is added in front of the question:
``<image>\\n`` for one image, ``Image-1: <image>\\nImage-2: <image>\\n...`` for several, and
``Frame1: <image>\\nFrame2: <image>\\n...`` for the frames of a video. After the chat template is
applied, each placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles of that image) + ``</img>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from interleaf.errors import InputError
from interleaf.processing.templates import ChatTemplate

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


def image_prefix(n_images: int) -> str:
    """Placeholders put in front of a question that has none: ``<image>\\n`` or ``Image-k: <image>\\n``..."""
    if n_images <= 0:
        return ""
    if n_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))


def video_prefix(n_frames: int) -> str:
    """Placeholders for the frames of a video: ``Frame1: <image>\\nFrame2: <image>\\n...``."""
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_frames))


def image_tokens(num_tiles: int, num_image_token: int = 256) -> str:
    """The text that stands for one image of ``num_tiles`` tiles."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def expand_image_placeholders(text: str, num_tiles: Sequence[int], num_image_token: int = 256) -> str:
    """Replace the k-th ``<image>`` with the image tokens of the k-th image.

    Raises:
        InputError: if the number of placeholders differs from the number of images.
    """
    count = text.count(IMAGE_PLACEHOLDER)
    if count != len(num_tiles):
        raise InputError(
            f"prompt has {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_tiles)} image(s) were given"
        )
    pieces = text.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for n, piece in zip(num_tiles, pieces[1:]):
        out.append(image_tokens(n, num_image_token))
        out.append(piece)
    return "".join(out)


def add_placeholders(
    question: str, n_images: int, history: Sequence | None = None, video: bool = False
) -> str:
    """Prefix the question with image (or video frame) placeholders when it has none and there is no history."""
    if n_images == 0 or IMAGE_PLACEHOLDER in question or history:
        return question
    return (video_prefix(n_images) if video else image_prefix(n_images)) + question


def build_prompt(
    template: ChatTemplate,
    question: str,
    num_tiles: Sequence[int] = (),
    history: Sequence[tuple[str, str]] | None = None,
    system_message: str | None = None,
    num_image_token: int = 256,
    video: bool = False,
) -> str:
    """The full, expanded prompt text for one chat turn (assistant turn left open).

    Args:
        template: the chat template.
        question: the new user message (may contain ``<image>`` placeholders).
        num_tiles: tiles per image (for a video: one entry of 1 per frame), in placeholder order.
        history: earlier (question, answer) turns; their ``<image>`` placeholders count too.
        video: the images are video frames (``FrameK:`` prefix instead of ``Image-K:``).
    """
    question = add_placeholders(question, len(num_tiles), history, video)
    prompt = template.chat_prompt(question, history, system_message)
    return expand_image_placeholders(prompt, num_tiles, num_image_token)
