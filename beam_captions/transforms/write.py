"""WriteOutputs: Parquet rows, previews, per-clip metas and failure records under one output root."""

from __future__ import annotations

from typing import Iterable, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import write_bytes, write_json
from beam_captions.io.metas import clip_meta, failure_meta
from beam_captions.io.parquet import caption_row, parquet_bytes
from beam_captions.io.paths import caption_table_path, failure_path, meta_path, preview_path
from beam_captions.metrics import count
from beam_captions.records import ClipInfo, ClipRef, Failure, WindowRecord, failure_from_exception

__all__ = ["SkipFinishedClips", "WriteOutputs", "write_clip"]

Element = Union[ClipInfo, WindowRecord, Failure]


class _WritePreviews(beam.DoFn):
    """Write each window's WebP, swap the bytes for the file's URI and drop any frames left."""

    def __init__(self, output: str):
        self.output = output

    def process(self, element: Element):
        if not isinstance(element, WindowRecord):
            yield element
            return
        element = element.replace(frames=None, preview_frames=None)
        if element.preview_webp is None:
            yield element
            return
        path = preview_path(self.output, element.clip_id, element.start_frame, element.end_frame)
        try:
            write_bytes(path, element.preview_webp, "image/webp")
        except Exception as error:  # noqa: BLE001
            yield failure_from_exception(
                error, source=element.source, clip_id=element.clip_id, stage="write", window_index=element.window_index
            )
            yield element.replace(preview_webp=None)
            return
        count("previews")
        yield element.replace(preview_webp=None, preview_uri=path)


def _count_row(record: WindowRecord) -> None:
    count("windows")
    if record.caption:
        count("captions")
    for check in record.checks().values():
        for flag in check.flags if check else ():
            count(f"flagged_{flag}")


def write_clip(output: str, clip_id: str, elements: Iterable[Element]) -> None:
    """Write one clip's failure records, its Parquet rows, then its metas (the marker that it is done)."""
    elements = list(elements)
    infos = [e for e in elements if isinstance(e, ClipInfo)]
    windows = sorted((e for e in elements if isinstance(e, WindowRecord)), key=lambda w: w.window_index)
    failures = [e for e in elements if isinstance(e, Failure)]
    for failure in failures:
        count(f"failures_{failure.stage}")
        write_json(failure_path(output, failure.name), failure_meta(failure))
    if windows:
        for record in windows:
            _count_row(record)
        write_bytes(caption_table_path(output, clip_id), parquet_bytes([caption_row(w, w.preview_uri) for w in windows]))
    count("clips")
    if not infos:
        count("clips_failed")
    meta = clip_meta(clip_id, elements[0].source, infos[0] if infos else None, windows, failures)
    write_json(meta_path(output, clip_id), meta)


def _unfinished(clip: ClipRef, output: str) -> bool:
    if FileSystems.exists(meta_path(output, clip.clip_id)):
        count("clips_skipped")
        return False
    return True


class SkipFinishedClips(beam.PTransform):
    """Drop ``ClipRef``s whose metas file exists under ``output``: an earlier run finished them."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def expand(self, clips):
        return clips | "Unfinished" >> beam.Filter(_unfinished, self.output)


class WriteOutputs(beam.PTransform):
    """Write everything under ``output`` (local or gs://), clip by clip.

    ``OUT/previews/<clip>/<start>_<end>.webp`` as windows pass, then per clip
    ``OUT/failures/<clip>_<where>_<stage>.json``, ``OUT/captions/<clip>.parquet`` (one row per
    window) and last ``OUT/metas/<clip>.json``: a clip with a metas file is complete, so a
    killed or retried run never leaves a clip half-written and never duplicates a row.
    """

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def expand(self, pcoll):
        output = self.output
        return (
            pcoll
            | "WritePreviews" >> beam.ParDo(_WritePreviews(output))
            | "ByClip" >> beam.Map(lambda e: (e.clip_id, e))
            | "GroupByClip" >> beam.GroupByKey()
            | "WriteClip" >> beam.MapTuple(lambda clip_id, elements: write_clip(output, clip_id, elements))
        )
