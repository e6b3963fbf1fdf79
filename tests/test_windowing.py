"""Window and sampling arithmetic: worked values and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_captions.media.windowing import (
    MAX_SAMPLED_FRAMES,
    MIN_FRAMES,
    FrameWindow,
    compute_windows,
    num_preview_frames,
    num_sampled_frames,
    preview_frame_indices,
    sample_frame_indices,
)


@pytest.mark.parametrize(
    ("window_frames", "clip_fps", "expected"),
    [(256, 30, 18), (300, 30, 20), (383, 30, 26), (256, 24, 22), (128, 30, 8), (60, 30, 4), (256, 60, 8)],
)
def test_sampled_frame_counts_at_2fps(window_frames: int, clip_fps: float, expected: int) -> None:
    assert num_sampled_frames(window_frames, clip_fps, 2.0) == expected
    window = FrameWindow(0, 0, window_frames - 1)
    assert len(sample_frame_indices(window, clip_fps, 2.0)) == expected


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (300, [(0, 299)]),
        (600, [(0, 255), (256, 599)]),
        (256, [(0, 255)]),
        (4, [(0, 3)]),
        (383, [(0, 382)]),
        (384, [(0, 255), (256, 383)]),
        (512, [(0, 255), (256, 511)]),
        (640, [(0, 255), (256, 511), (512, 639)]),
    ],
)
def test_window_spans(total: int, expected: list[tuple[int, int]]) -> None:
    windows = compute_windows(total, 256, 128)
    assert [(w.start, w.end) for w in windows] == expected
    assert [w.index for w in windows] == list(range(len(expected)))


@pytest.mark.parametrize("total", [0, 1, 2, 3])
def test_short_clips_have_no_window(total: int) -> None:
    assert compute_windows(total, 256, 128) == []


@pytest.mark.parametrize(("window_size", "threshold"), [(0, 0), (-1, 0), (256, -1)])
def test_invalid_window_options(window_size: int, threshold: int) -> None:
    with pytest.raises(ValueError):
        compute_windows(100, window_size, threshold)


def test_preview_indices_at_1fps() -> None:
    window = FrameWindow(1, 256, 599)
    assert preview_frame_indices(window, 30.0, 1.0) == [256 + 30 * k for k in range(11)]
    assert num_preview_frames(window.num_frames, 30.0, 1.0) == 11


@st.composite
def window_options(draw: st.DrawFn) -> tuple[int, int, int]:
    total = draw(st.integers(0, 5000))
    window_size = draw(st.integers(1, 1024))
    threshold = draw(st.integers(0, window_size))
    return total, window_size, threshold


fps_values = st.floats(1.0, 120.0, allow_nan=False, allow_infinity=False)
sampling_values = st.floats(0.1, 30.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(window_options())
def test_windows_cover_frames_once_in_order(options: tuple[int, int, int]) -> None:
    total, window_size, threshold = options
    windows = compute_windows(total, window_size, threshold)
    if total < MIN_FRAMES:
        assert windows == []
        return
    covered = [i for w in windows for i in range(w.start, w.end + 1)]
    assert covered == list(range(total))
    assert [w.index for w in windows] == list(range(len(windows)))


@settings(max_examples=300, deadline=None)
@given(window_options())
def test_window_sizes_respect_threshold(options: tuple[int, int, int]) -> None:
    total, window_size, threshold = options
    windows = compute_windows(total, window_size, threshold)
    if len(windows) == 1 and total <= window_size:
        assert windows[0].num_frames == total  # a short clip is one window whatever its length
        return
    for window in windows:
        assert window.num_frames >= threshold
        assert window.num_frames <= window_size + max(threshold - 1, 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), fps_values, sampling_values)
def test_sample_counts(window_frames: int, clip_fps: float, sampling_fps: float) -> None:
    count = num_sampled_frames(window_frames, clip_fps, sampling_fps)
    assert count % 2 == 0
    assert count >= MIN_FRAMES
    if window_frames >= MIN_FRAMES:
        assert count <= min(MAX_SAMPLED_FRAMES, window_frames - window_frames % 2)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.integers(MIN_FRAMES, 1500), fps_values, sampling_values)
def test_sample_indices_within_window(start: int, length: int, clip_fps: float, sampling_fps: float) -> None:
    window = FrameWindow(0, start, start + length - 1)
    indices = sample_frame_indices(window, clip_fps, sampling_fps)
    assert len(indices) == num_sampled_frames(length, clip_fps, sampling_fps)
    assert all(a < b for a, b in zip(indices, indices[1:]))  # sorted, no frame twice
    assert indices[0] == window.start and indices[-1] == window.end
    assert all(window.start <= i <= window.end for i in indices)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 1500), fps_values, st.floats(0.1, 10.0))
def test_preview_indices_within_window(start: int, length: int, clip_fps: float, target_fps: float) -> None:
    window = FrameWindow(0, start, start + length - 1)
    indices = preview_frame_indices(window, clip_fps, target_fps)
    assert len(indices) == num_preview_frames(length, clip_fps, target_fps)
    assert indices[0] == window.start
    assert indices == sorted(indices)
    assert all(window.start <= i <= window.end for i in indices)
