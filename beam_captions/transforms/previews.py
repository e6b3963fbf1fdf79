"""GeneratePreviews: an animated WebP per window from the preview frames of the decode pass."""

from __future__ import annotations

from typing import Iterator, Union

import apache_beam as beam

from beam_captions.media.webp import encode_webp
from beam_captions.metrics import count
from beam_captions.records import Failure, WindowRecord, failure_from_exception

__all__ = ["GeneratePreviews", "preview_window"]


def preview_window(
    record: WindowRecord, *, quality: int, compression_level: int, threads: int
) -> Iterator[Union[WindowRecord, Failure]]:
    """The window with its WebP bytes; on an encoding failure, the window unchanged plus a ``Failure``."""
    if record.preview_frames is None:
        yield record
        return
    try:
        webp = encode_webp(
            record.preview_frames,
            fps=record.preview_fps or 1.0,
            quality=quality,
            compression_level=compression_level,
            threads=threads,
        )
    except Exception as error:  # noqa: BLE001 - one bad preview never fails the window
        yield failure_from_exception(
            error, source=record.source, clip_id=record.clip_id, stage="preview", window_index=record.window_index
        )
        yield record.replace(preview_frames=None)
        return
    count("previews_encoded")
    yield record.replace(preview_frames=None, preview_webp=webp)


class GeneratePreviews(beam.PTransform):
    """Encode ``preview_frames`` of each ``WindowRecord`` as a looping, lossy animated WebP.

    Example: ``windows | GeneratePreviews(quality=50, compression_level=6)``; other elements pass through.
    """

    def __init__(self, *, quality: int = 50, compression_level: int = 6, num_cpus_per_worker: int = 4):
        super().__init__()
        self.options = {"quality": quality, "compression_level": compression_level, "threads": num_cpus_per_worker}

    def expand(self, pcoll):
        options = self.options
        return pcoll | "EncodeWebP" >> beam.FlatMap(
            lambda e: preview_window(e, **options) if isinstance(e, WindowRecord) else [e]
        )
