"""WriteOutputs: Parquet rows, previews, per-clip metas and failure records under one output root."""

from __future__ import annotations

from typing import Iterable, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import write_bytes, write_json
from beam_captions.io.metas import clip_meta, failure_meta
from beam_captions.io.parquet import CAPTION_SCHEMA, caption_row
from beam_captions.io.paths import captions_dir, failure_path, meta_path, preview_path
from beam_captions.metrics import count
from beam_captions.records import ClipInfo, Failure, WindowRecord, failure_from_exception

__all__ = ["WriteOutputs"]

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


def _row(record: WindowRecord) -> dict:
    count("windows")
    if record.caption:
        count("captions")
    for check in record.checks().values():
        for flag in check.flags if check else ():
            count(f"flagged_{flag}")
    return caption_row(record, record.preview_uri)


def _write_failure(output: str, failure: Failure) -> None:
    count(f"failures_{failure.stage}")
    write_json(failure_path(output, failure.name), failure_meta(failure))


def _write_meta(output: str, clip_id: str, elements: Iterable[Element]) -> None:
    elements = list(elements)
    infos = [e for e in elements if isinstance(e, ClipInfo)]
    windows = [e for e in elements if isinstance(e, WindowRecord)]
    failures = [e for e in elements if isinstance(e, Failure)]
    source = elements[0].source
    count("clips")
    if not infos:
        count("clips_failed")
    write_json(meta_path(output, clip_id), clip_meta(clip_id, source, infos[0] if infos else None, windows, failures))


class WriteOutputs(beam.PTransform):
    """Write everything under ``output`` (local or gs://).

    ``OUT/captions/*.parquet`` one row per window, ``OUT/previews/<clip>/<start>_<end>.webp``,
    ``OUT/metas/<clip>.json`` one per clip, ``OUT/failures/<clip>_<where>_<stage>.json``.
    """

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def expand(self, pcoll):
        output = self.output
        written = pcoll | "WritePreviews" >> beam.ParDo(_WritePreviews(output))
        (
            written
            | "Windows" >> beam.Filter(lambda e: isinstance(e, WindowRecord))
            | "ToRow" >> beam.Map(_row)
            | "WriteParquet" >> beam.io.WriteToParquet(
                FileSystems.join(captions_dir(output), "captions"), CAPTION_SCHEMA, file_name_suffix=".parquet"
            )
        )
        (
            written
            | "Failures" >> beam.Filter(lambda e: isinstance(e, Failure))
            | "WriteFailure" >> beam.Map(lambda failure: _write_failure(output, failure))
        )
        return (
            written
            | "ByClip" >> beam.Map(lambda e: (e.clip_id, e))
            | "GroupByClip" >> beam.GroupByKey()
            | "WriteMeta" >> beam.MapTuple(lambda clip_id, elements: _write_meta(output, clip_id, elements))
        )
