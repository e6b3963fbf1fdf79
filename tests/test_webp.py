"""encode_webp output, checked with Pillow (PyAV cannot decode animated WebP)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from clips import textured_frames
from PIL import Image

from beam_captions.media.webp import PreviewEncodeError, encode_webp


def open_webp(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP"
    return image


def frame_durations(image: Image.Image) -> list[int]:
    durations = []
    for k in range(image.n_frames):
        image.seek(k)
        image.load()
        durations.append(image.info["duration"])
    return durations


@pytest.mark.parametrize(("fps", "num_frames"), [(1.0, 5), (2.5, 3), (30.0, 4), (1 / 3, 2)])
def test_animated_webp(fps: float, num_frames: int) -> None:
    frames = textured_frames(num_frames, 48, 64)
    image = open_webp(encode_webp(frames, fps=fps))
    assert image.is_animated
    assert image.n_frames == num_frames
    assert image.size == (64, 48)
    assert image.info["loop"] == 0
    assert all(abs(d - 1000 / fps) <= 1 for d in frame_durations(image))


def test_frames_keep_their_order_and_content() -> None:
    levels = [20, 120, 220, 70]
    frames = np.stack([np.full((47, 65, 3), level, np.uint8) for level in levels])  # odd sizes too
    image = open_webp(encode_webp(frames, fps=1.0))
    assert image.size == (65, 47)
    for k, level in enumerate(levels):
        image.seek(k)
        assert abs(float(np.asarray(image.convert("RGB")).mean()) - level) < 3


def test_single_frame_gives_a_still_webp() -> None:
    image = open_webp(encode_webp(textured_frames(1, 32, 32), fps=1.0))
    assert image.n_frames == 1
    assert image.size == (32, 32)


def test_non_contiguous_input() -> None:
    frames = textured_frames(3, 48, 64)[:, ::2, ::2]
    image = open_webp(encode_webp(frames, fps=2.0))
    assert (image.n_frames, image.size) == (3, (32, 24))


def test_quality_changes_size() -> None:
    frames = textured_frames(4, 96, 128)
    low, high = (encode_webp(frames, fps=1.0, quality=q) for q in (10, 90))
    assert len(high) > len(low)


def test_compression_level_changes_output() -> None:
    frames = textured_frames(4, 96, 128)
    fast, slow = (encode_webp(frames, fps=1.0, compression_level=level) for level in (0, 6))
    assert fast != slow
    assert open_webp(fast).n_frames == open_webp(slow).n_frames == 4


@pytest.mark.parametrize(
    ("frames", "options"),
    [
        (np.zeros((0, 16, 16, 3), np.uint8), {}),
        (np.zeros((2, 0, 16, 3), np.uint8), {}),
        (np.zeros((2, 16, 16, 4), np.uint8), {}),
        (np.zeros((16, 16, 3), np.uint8), {}),
        (np.zeros((2, 16, 16, 3), np.float32), {}),
        ([[[[0, 0, 0]]]], {}),
        (np.zeros((2, 16, 16, 3), np.uint8), {"fps": 0.0}),
        (np.zeros((2, 16, 16, 3), np.uint8), {"quality": 101}),
        (np.zeros((2, 16, 16, 3), np.uint8), {"compression_level": 7}),
        (np.zeros((2, 16, 16, 3), np.uint8), {"threads": 0}),
    ],
)
def test_bad_input_raises(frames: np.ndarray, options: dict) -> None:
    with pytest.raises(PreviewEncodeError):
        encode_webp(frames, **{"fps": 1.0, **options})


def test_encoder_failure_is_wrapped() -> None:
    frames = np.zeros((2, 20000, 16, 3), np.uint8)  # beyond WebP's 16383-pixel limit
    with pytest.raises(PreviewEncodeError, match="WebP encoding"):
        encode_webp(frames, fps=1.0)
