"""Video decoding (PyAV) and InternVL's uniform segment sampling.

A video becomes ``num_segments`` frames: the frame range is cut into equal segments and the frame at
the middle of each is taken (``index_k = int(start + seg/2 + round(seg*k))``, as in InternVL's
``get_index``); each frame is one 448 px tile (no dynamic tiling, no thumbnail). The prompt then
carries ``Frame1: <image>\\nFrame2: <image>\\n...`` (see ``interleaf.processing.prompt``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from interleaf.errors import InputError
from interleaf.processing.image import preprocess_image


def segment_indices(
    num_frames: int,
    num_segments: int,
    fps: float | None = None,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """Frame indices of uniform segment sampling over ``[start, end]`` (``bound`` in seconds, optional).

    ``seg = (end_idx - start_idx) / num_segments`` with ``end_idx`` the last frame (inclusive), and
    ``index_k = int(start_idx + seg / 2 + round(seg * k))`` (Python's round: half to even, like numpy).
    """
    if num_frames <= 0:
        raise InputError("video has no frames")
    if num_segments <= 0:
        raise InputError(f"num_segments must be positive, got {num_segments}")
    if bound is not None and fps:
        start_idx = max(first_idx, round(bound[0] * fps))
        end_idx = min(round(bound[1] * fps), num_frames - 1)
    else:
        start_idx, end_idx = first_idx, num_frames - 1
    seg = float(end_idx - start_idx) / num_segments
    return [min(num_frames - 1, int(start_idx + seg / 2 + round(seg * k))) for k in range(num_segments)]


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise InputError(f"video not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"video path is a directory: {path}")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"unsupported or corrupt video: {path} ({str(exc).splitlines()[0]})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"unsupported video: {path} (no video stream)")
    return container


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(number of frames, frames per second) of a video file.

    Uses the container's frame count when it has one, else counts the video packets (no decoding).
    """
    import av

    path = os.fspath(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
        n = int(stream.frames or 0)
        if n <= 0:
            try:
                n = sum(1 for p in container.demux(stream) if p.size > 0)
            except av.error.FFmpegError as exc:
                raise InputError(f"corrupt video: {path} ({str(exc).splitlines()[0]})") from None
        return n, fps
    finally:
        container.close()


def read_video_frames(
    path: str | os.PathLike, num_segments: int = 8, bound: tuple[float, float] | None = None
) -> list[Image.Image]:
    """Decode the ``num_segments`` uniformly sampled frames of a video as RGB PIL images."""
    path = os.fspath(path)
    num_frames, fps = video_info(path)
    return read_frames_at(path, segment_indices(num_frames, num_segments, fps, bound))


def read_frames_at(path: str | os.PathLike, wanted: Sequence[int]) -> list[Image.Image]:
    """Decode the frames numbered ``wanted`` (any order, repeats allowed) as RGB PIL images; only
    those are converted and kept, decoding stops after the last one."""
    import av

    path = os.fspath(path)
    if not wanted:
        return []
    needed = set(wanted)
    last_needed = max(wanted)
    frames: dict[int, Image.Image] = {}
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in needed:
                frames[i] = frame.to_image().convert("RGB")
            if i >= last_needed:
                break
    except av.error.FFmpegError as exc:
        if not frames:
            raise InputError(f"corrupt video: {path} ({str(exc).splitlines()[0]})") from None
    finally:
        container.close()
    if not frames:
        raise InputError(f"unsupported or corrupt video: {path} (no frame could be decoded)")
    # A container may announce more frames than it decodes: fall back to the nearest decoded earlier one.
    out = []
    for i in wanted:
        if i not in frames:
            earlier = [j for j in frames if j <= i]
            i = max(earlier) if earlier else min(frames)
        out.append(frames[i])
    return out


def load_video(
    path: str | os.PathLike,
    num_segments: int = 8,
    bound: tuple[float, float] | None = None,
    image_size: int = 448,
) -> torch.Tensor:
    """Sample ``num_segments`` frames and preprocess each to one tile.

    Returns:
        pixel_values: float32 [num_segments, 3, image_size, image_size] (one tile per frame).
    """
    frames = read_video_frames(path, num_segments, bound)
    return frames_to_pixels(frames, image_size)


def frames_to_pixels(frames: Sequence[Image.Image], image_size: int = 448) -> torch.Tensor:
    """One normalised tile per frame: float32 [len(frames), 3, image_size, image_size]."""
    return torch.cat([preprocess_image(f, max_num=1, image_size=image_size) for f in frames], dim=0)
