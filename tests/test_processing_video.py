"""Video decoding with PyAV and uniform segment sampling, on videos encoded here."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from interleaf.errors import InputError
from interleaf.processing.image import preprocess_image
from interleaf.processing.video import load_video, read_video_frames, segment_indices, video_info


def _frame_ids(frames) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 8) for f in frames]


def _reference_indices(num_frames, num_segments, fps=None, bound=None):
    # InternVL's get_index, written from its description: half-to-even rounding of seg * k
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(0, round(start * fps)) if bound else 0
    end_idx = min(round(end * fps), num_frames - 1) if bound else num_frames - 1
    seg = (end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_segments)]


def test_segment_indices_formula():
    assert segment_indices(30, 8) == [1, 5, 8, 12, 15, 19, 23, 26]
    for n in (1, 2, 7, 8, 9, 31, 100, 257):
        for s in (1, 4, 8, 16, 32):
            idx = segment_indices(n, s)
            assert idx == _reference_indices(n, s)
            assert all(0 <= i < n for i in idx) and idx == sorted(idx)
    assert segment_indices(100, 4, fps=10, bound=(2.0, 6.0)) == _reference_indices(100, 4, 10, (2.0, 6.0))
    with pytest.raises(InputError):
        segment_indices(0, 8)


@pytest.mark.parametrize(
    ("suffix", "codec", "pix_fmt"), [("mkv", "ffv1", "yuv444p"), ("mp4", "mpeg4", "yuv420p")]
)
def test_decodes_the_sampled_frames(tmp_path, suffix, codec, pix_fmt, gray_video):
    path = tmp_path / f"clip.{suffix}"
    gray_video(path, 30, codec, pix_fmt)
    assert video_info(path) == (30, 10.0)
    frames = read_video_frames(path, num_segments=8)
    assert _frame_ids(frames) == segment_indices(30, 8) == [1, 5, 8, 12, 15, 19, 23, 26]
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    # a time window: seconds 1.0 .. 2.0 at 10 fps = frames 10 .. 20
    assert _frame_ids(read_video_frames(path, 4, bound=(1.0, 2.0))) == segment_indices(
        30, 4, 10.0, (1.0, 2.0)
    )


def test_load_video_one_tile_per_frame(tmp_path, gray_video):
    path = tmp_path / "clip.mkv"
    gray_video(path, 12)
    px = load_video(path, num_segments=4)
    assert px.shape == (4, 3, 448, 448) and px.dtype == torch.float32
    frames = read_video_frames(path, 4)
    torch.testing.assert_close(px[2], preprocess_image(frames[2], max_num=1)[0])
    # more segments than frames: indices repeat, still one tile each
    assert load_video(path, num_segments=16).shape[0] == 16


def test_bad_videos_raise_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01 definitely not a video" * 10)
    with pytest.raises(InputError, match="junk.mp4") as info:
        load_video(junk)
    assert "\n" not in str(info.value)
    # an audio-only file has no video stream
    audio = tmp_path / "tone.wav"
    container = av.open(str(audio), "w")
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    with pytest.raises(InputError, match="no video stream"):
        load_video(audio)
