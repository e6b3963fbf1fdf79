"""Animated WebP previews, encoded in process with PyAV's libwebp encoder."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

__all__ = ["PreviewEncodeError", "encode_webp"]

_MAX_RATE_DENOMINATOR = 1001


class PreviewEncodeError(Exception):
    """A preview could not be encoded (bad frames, bad options or an encoder failure)."""


def _check_inputs(frames: np.ndarray, fps: float, quality: int, compression_level: int, threads: int) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise PreviewEncodeError(f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise PreviewEncodeError(f"frames must have shape (N, height, width, 3), got {frames.shape}")
    if min(frames.shape[:3]) == 0:
        raise PreviewEncodeError(f"cannot encode a preview from no pixels, got shape {frames.shape}")
    if not fps > 0:
        raise PreviewEncodeError(f"fps must be positive, got {fps}")
    if not 0 <= quality <= 100:
        raise PreviewEncodeError(f"quality must be within 0..100, got {quality}")
    if not 0 <= compression_level <= 6:
        raise PreviewEncodeError(f"compression_level must be within 0..6, got {compression_level}")
    if threads < 1:
        raise PreviewEncodeError(f"threads must be >= 1, got {threads}")


def _add_stream(
    container: av.container.OutputContainer, shape: tuple[int, ...], fps: float, quality: int, level: int, threads: int
) -> av.VideoStream:
    stream = container.add_stream("libwebp", rate=Fraction(fps).limit_denominator(_MAX_RATE_DENOMINATOR))
    stream.height, stream.width = shape[1], shape[2]
    stream.pix_fmt = "yuv420p"
    stream.thread_count = threads
    stream.options = {"quality": str(quality), "compression_level": str(level), "lossless": "0"}
    return stream


def encode_webp(
    frames: np.ndarray, *, fps: float, quality: int = 50, compression_level: int = 6, threads: int = 4
) -> bytes:
    """Encode RGB frames ``(N, h, w, 3)`` as a lossy WebP that loops forever.

    Several frames give an animated WebP showing each frame ``1 / fps`` seconds;
    a single frame gives a still WebP. ``threads`` sets the codec thread count,
    which FFmpeg 8.1's libwebp wrapper does not pass on to libwebp.
    """
    _check_inputs(frames, fps, quality, compression_level, threads)
    buffer = io.BytesIO()
    try:
        with av.open(buffer, "w", format="webp", options={"loop": "0"}) as container:
            stream = _add_stream(container, frames.shape, fps, quality, compression_level, threads)
            for pts, array in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                frame.pts = pts
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    except av.error.FFmpegError as exc:
        raise PreviewEncodeError(f"WebP encoding of {frames.shape} frames failed: {exc}") from exc
    return buffer.getvalue()
