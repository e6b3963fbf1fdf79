"""Window and frame-sampling arithmetic (pure functions, no decoding).

Windows are counted in source frames of a clip and use inclusive end frames:
the clip is cut into ``total // window_size`` full windows; a remainder of at
least ``remainder_threshold`` frames becomes its own window, a shorter one is
appended to the last window. Clips shorter than ``MIN_FRAMES`` get no caption window; previews alone
need one frame (``MIN_PREVIEW_FRAMES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Sequence

import numpy as np

__all__ = [
    "MIN_FRAMES",
    "MIN_PREVIEW_FRAMES",
    "MAX_SAMPLED_FRAMES",
    "FrameWindow",
    "compute_windows",
    "num_sampled_frames",
    "sample_frame_indices",
    "num_preview_frames",
    "preview_frame_indices",
]

MIN_FRAMES = 4  # a caption window's model frames
MIN_PREVIEW_FRAMES = 1  # a previews-only run: a still preview of a one-frame clip
MAX_SAMPLED_FRAMES = 768


@dataclass(frozen=True)
class FrameWindow:
    """A span of source frames ``[start, end]`` (both inclusive)."""

    index: int
    start: int
    end: int

    @property
    def num_frames(self) -> int:
        return self.end - self.start + 1


def compute_windows(
    total: int, window_size: int, remainder_threshold: int, min_frames: int = MIN_FRAMES
) -> list[FrameWindow]:
    """Cut ``total`` frames into caption windows; none below ``min_frames`` frames (``MIN_FRAMES`` for
    captions, ``MIN_PREVIEW_FRAMES`` when only previews are made)."""
    if window_size <= 0:
        raise ValueError(f"window_size must be positive, got {window_size}")
    if remainder_threshold < 0:
        raise ValueError(f"remainder_threshold must be >= 0, got {remainder_threshold}")
    if total < max(1, min_frames):
        return []
    if total <= window_size:
        return [FrameWindow(0, 0, total - 1)]
    spans = [[i * window_size, (i + 1) * window_size - 1] for i in range(total // window_size)]
    remainder = total % window_size
    if remainder >= remainder_threshold and remainder > 0:
        spans.append([total - remainder, total - 1])
    elif remainder > 0:
        spans[-1][1] = total - 1
    return [FrameWindow(i, start, end) for i, (start, end) in enumerate(spans)]


def _floor_to_even(value: int) -> int:
    return value - value % 2


def num_sampled_frames(window_frames: int, clip_fps: float, sampling_fps: float) -> int:
    """Number of model frames for a window: proportional to its duration, even, clamped."""
    wanted = window_frames / clip_fps * sampling_fps
    upper = max(MIN_FRAMES, _floor_to_even(min(MAX_SAMPLED_FRAMES, window_frames)))
    clamped = min(max(wanted, MIN_FRAMES), upper)
    return int(round(clamped / 2) * 2)


def sample_frame_indices(window: FrameWindow, clip_fps: float, sampling_fps: float) -> list[int]:
    """Source frame indices fed to the model for ``window`` (evenly spaced, ends included)."""
    count = num_sampled_frames(window.num_frames, clip_fps, sampling_fps)
    return [int(i) for i in np.round(np.linspace(window.start, window.end, count))]


def num_preview_frames(window_frames: int, clip_fps: float, target_fps: float) -> int:
    """Frames in a window's preview: its duration times ``target_fps``, at least one."""
    return max(1, int(round(window_frames / clip_fps * target_fps)))


def preview_frame_indices(window: FrameWindow, clip_fps: float, target_fps: float) -> list[int]:
    """Source frames shown in the preview, one every ``1 / target_fps`` seconds from the start."""
    count = num_preview_frames(window.num_frames, clip_fps, target_fps)
    step = clip_fps / target_fps
    return [min(window.end, window.start + int(round(k * step))) for k in range(count)]


def sample_frame_indices_by_time(window: FrameWindow, times: Sequence[float], sampling_fps: float) -> list[int]:
    """``sample_frame_indices`` for a clip whose frames start at ``times`` (seconds, one per frame plus the
    end of the last): as many frames as the window's duration asks, taken at evenly spaced times (both
    ends included), each the frame shown at that time. For variable frame rates."""
    start, end = times[window.start], times[window.end + 1]
    duration = max(end - start, 1e-9)
    count = num_sampled_frames(window.num_frames, window.num_frames / duration, sampling_fps)
    wanted = np.linspace(times[window.start], times[window.end], count) + 1e-6  # a time on a frame picks it
    shown = np.searchsorted(np.asarray(times[window.start:window.end + 1]), wanted, side="right") - 1
    return [window.start + int(i) for i in np.clip(shown, 0, window.num_frames - 1)]


def preview_frame_indices_by_time(window: FrameWindow, times: Sequence[float], target_fps: float) -> list[int]:
    """``preview_frame_indices`` by presentation time: the frame shown every ``1 / target_fps`` seconds."""
    start, end = times[window.start], times[window.end + 1]
    count = max(1, int(round((end - start) * target_fps)))
    wanted = start + np.arange(count) / target_fps + 1e-6
    shown = np.searchsorted(np.asarray(times[window.start:window.end + 1]), wanted, side="right") - 1
    return [window.start + int(i) for i in np.clip(shown, 0, window.num_frames - 1)]
