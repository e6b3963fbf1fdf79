"""GeneratePreviews: an animated WebP per window from the preview frames of the decode pass."""

from __future__ import annotations

from typing import Iterator, Optional, Union

import apache_beam as beam
import numpy as np

from beam_captions.limits import MAX_ENCODER_THREADS
from beam_captions.media.webp import encode_webp
from beam_captions.metrics import count
from beam_captions.records import Failure, WindowRecord, failure_from_exception

__all__ = ["GeneratePreviews", "conform_preview", "preview_window"]


def conform_preview(
    frames: np.ndarray, fps: float, target_fps: Optional[float], target_height: Optional[int]
) -> tuple[np.ndarray, float]:
    """``frames`` at ``fps`` brought to at most ``target_fps`` (evenly kept frames) and to ``target_height``
    (width keeping the aspect ratio, even), for a ``GeneratePreviews`` asked for other values than the
    frames were prepared with. A higher target than the frames have is left as it is."""
    if target_fps is not None and target_fps < fps and len(frames) > 1:
        count = len(frames)
        keep = max(1, round(count * target_fps / fps))
        frames = frames[np.linspace(0, count - 1, keep).round().astype(int)]
        fps = fps * keep / count  # the same span of time in fewer frames
    if target_height is not None and frames.shape[1] != target_height:
        import av

        from beam_captions.media.decode import preview_size

        width, height = preview_size(frames.shape[2], frames.shape[1], target_height)
        frames = np.stack([
            av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(width, height, interpolation="AREA").to_ndarray()
            for frame in frames
        ])
    return frames, fps


def preview_window(
    record: WindowRecord,
    *,
    quality: int,
    compression_level: int,
    threads: int,
    target_fps: Optional[float] = None,
    target_height: Optional[int] = None,
) -> Iterator[Union[WindowRecord, Failure]]:
    """The window with its WebP bytes; on an encoding failure, the window without them, carrying a ``Failure``."""
    if record.preview_frames is None:
        yield record
        return
    try:
        frames, fps = conform_preview(record.preview_frames, record.preview_fps or 1.0, target_fps, target_height)
        webp = encode_webp(
            frames,
            fps=fps,
            quality=quality,
            compression_level=compression_level,
            threads=threads,
        )
    except Exception as error:  # noqa: BLE001 - one bad preview never fails the window
        yield record.replace(preview_frames=None).with_failure(failure_from_exception(
            error, source=record.source, clip_id=record.clip_id, stage="preview", window_index=record.window_index
        ))
        return
    count("previews_encoded")
    yield record.replace(preview_frames=None, preview_webp=webp)


class GeneratePreviews(beam.PTransform):
    """Encode ``preview_frames`` of each ``WindowRecord`` as a looping, lossy animated WebP.

    Example: ``windows | GeneratePreviews(quality=50, compression_level=6)``; other elements pass through.
    """

    def __init__(
        self,
        *,
        quality: int = 50,
        compression_level: int = 6,
        num_cpus_per_worker: int = 4,
        target_fps: Optional[float] = None,
        target_height: Optional[int] = None,
        verbose: bool = False,
    ):
        """``target_fps``/``target_height``: the reference's PreviewStage names. The preview frames are
        chosen and sized when the clip is decoded (``PrepareWindows(preview=PreviewSpec(...))``); given
        here, frames prepared faster or at another height are thinned and resized to them."""
        super().__init__()
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        if target_height is not None and not 2 <= target_height <= 16383:
            raise ValueError(f"target_height must be between 2 and 16383, got {target_height}")
        if not 1 <= num_cpus_per_worker <= MAX_ENCODER_THREADS:
            raise ValueError(f"num_cpus_per_worker must be between 1 and {MAX_ENCODER_THREADS}, "
                             f"got {num_cpus_per_worker}")
        self.verbose = verbose
        self.options = {"quality": quality, "compression_level": compression_level, "threads": num_cpus_per_worker,
                        "target_fps": target_fps, "target_height": target_height}

    def expand(self, pcoll):
        options = self.options
        return pcoll | "EncodeWebP" >> beam.FlatMap(
            lambda e: preview_window(e, **options) if isinstance(e, WindowRecord) else [e]
        )
