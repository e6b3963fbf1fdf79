"""WriteOutputs: Parquet rows, previews, per-clip metas and failure records under one output root."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import apache_beam as beam
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import write_bytes, write_json
from beam_captions.io.metas import clip_meta, failure_meta
from beam_captions.io.parquet import caption_row, parquet_bytes
from beam_captions.io.paths import caption_table_path, failure_path, meta_path, preview_path
from beam_captions.metrics import count
from beam_captions.records import ClipInfo, ClipRef, Failure, WindowRecord, failure_from_exception

__all__ = ["SkipFinishedClips", "WriteOutputs", "clip_complete", "time_partition", "write_clip"]

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
        count("caption_prompt_tokens", record.caption_prompt_tokens or 0)
    for check in record.checks().values():
        for flag in check.flags if check else ():
            count(f"flagged_{flag}")


def write_clip(output: str, clip_id: str, elements: Iterable[Element], partition: Optional[str] = None) -> None:
    """Write one clip's failure records, its Parquet rows, then its metas (the marker that it is done).

    ``partition`` (streaming: the event-time window) puts the rows in ``captions/<partition>/``.
    """
    elements = list(elements)
    infos = [e for e in elements if isinstance(e, ClipInfo)]
    by_index: dict[int, WindowRecord] = {}
    for element in elements:  # a window delivered twice (a retried bundle, a re-reported file) counts once
        if isinstance(element, WindowRecord):
            by_index.setdefault(element.window_index, element)
    windows = [by_index[i] for i in sorted(by_index)]
    failures = list({f.name: f for f in elements if isinstance(f, Failure)}.values())
    for failure in failures:
        count(f"failures_{failure.stage}")
        write_json(failure_path(output, failure.name), failure_meta(failure))
    if windows:
        for record in windows:
            _count_row(record)
        rows = parquet_bytes([caption_row(w) for w in windows])
        write_bytes(caption_table_path(output, clip_id, partition), rows)
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


def clip_complete(elements: Iterable[Element]) -> bool:
    """Whether every element of a clip has arrived: its ``ClipInfo`` (or ``prepare`` failure) and as
    many distinct windows as that says went out."""
    elements = list(elements)
    windows = {e.window_index for e in elements if isinstance(e, WindowRecord)}
    for element in elements:
        if isinstance(element, ClipInfo) and len(windows) >= element.num_windows:
            return True
        if isinstance(element, Failure) and element.stage == "prepare" and len(windows) >= element.windows_before:
            return True
    return False


def time_partition(elements: Iterable[Element], window_seconds: Optional[float]) -> Optional[str]:
    """``window=<UTC start>`` of the fixed event-time window of the clip's arrival (streaming), else ``None``.

    The arrival time travels in the clip's ``ClipInfo`` or ``prepare`` failure: element timestamps
    are not relied on past the model steps, which hand windows on as they finish.
    """
    found = [e.found_at for e in elements if isinstance(e, (ClipInfo, Failure)) and e.found_at is not None]
    if not window_seconds or not found:
        return None
    start = Timestamp.of(found[0] - found[0] % window_seconds)
    return "window=" + start.to_utc_datetime().strftime("%Y-%m-%dT%H-%M-%SZ")


class _WriteCompleteInBundle(beam.DoFn):
    """Writes each clip as soon as all its elements have passed in this bundle; hands on the elements
    of clips it has not seen whole when the bundle ends (to ``_WriteWhenComplete``).

    Beam's local runner takes a clip from decode to write in one bundle, so there every clip is
    written here, on the worker that made it; where a clip's elements span bundles (Dataflow between
    GPU and CPU steps, streaming) the keyed write completes it.
    """

    def __init__(self, output: str, window_seconds: Optional[float]):
        self.output = output
        self.window_seconds = window_seconds
        self.held: dict[str, list[WindowedValue]] = {}

    def start_bundle(self) -> None:
        self.held = {}

    def process(self, element: Element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        held = self.held.setdefault(element.clip_id, [])
        held.append(WindowedValue(element, timestamp, [window]))
        arrived = [value.value for value in held]
        if clip_complete(arrived):
            write_clip(self.output, element.clip_id, arrived, time_partition(arrived, self.window_seconds))
            del self.held[element.clip_id]
        return ()

    def finish_bundle(self):
        for held in self.held.values():
            yield from held
        self.held = {}


class _WriteWhenComplete(beam.DoFn):
    """Buffers each clip's elements (keyed by clip id) and writes the clip as soon as it is complete.

    Completion is known from the elements themselves, not from a watermark, so a clip's files
    appear as soon as its last window is through, in batch and streaming alike. A clip still
    incomplete when its window ends (batch: the end of input) is written with what arrived and
    a ``write`` failure saying so.
    """

    BUFFER = BagStateSpec("elements", PickleCoder())
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, output: str, window_seconds: Optional[float]):
        self.output = output
        self.window_seconds = window_seconds

    def process(
        self,
        keyed,
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        end=beam.DoFn.TimerParam(END),
    ):
        clip_id, element = keyed
        buffer.add(element)
        arrived = list(buffer.read())
        if clip_complete(arrived):
            write_clip(self.output, clip_id, arrived, time_partition(arrived, self.window_seconds))
            buffer.clear()
        else:
            end.set(window.max_timestamp())

    @on_timer(END)
    def flush(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER)):
        elements = list(buffer.read())
        if not elements:
            return
        missing = RuntimeError("the clip's elements did not all arrive; written with what did")
        elements.append(failure_from_exception(missing, source=elements[0].source, clip_id=key, stage="write"))
        write_clip(self.output, key, elements, time_partition(elements, self.window_seconds))
        buffer.clear()


class WriteOutputs(beam.PTransform):
    """Write everything under ``output`` (local or gs://), clip by clip, as each clip completes.

    ``OUT/previews/<clip>/<start>_<end>.webp`` as windows pass, then per clip
    ``OUT/failures/<clip>_<where>_<stage>.json``, ``OUT/captions/<clip>.parquet`` (one row per
    window) and last ``OUT/metas/<clip>.json``: a clip with a metas file is complete, so a
    killed or retried run never leaves a clip half-written and never duplicates a row.

    Streaming: with ``window_seconds`` the rows go to ``OUT/captions/window=<UTC start>/``, the
    fixed event-time window of the clip's arrival. A clip is written as soon as it is complete,
    never dropped for lateness: a late clip lands in its own (older) window's folder.

    The keyed write is stateful, and Beam's local runner runs a stateful stage on one worker: the
    ``Gather`` shuffle keeps the steps before it (decoding, previews, captioning) out of that stage,
    so that they run on every local worker, and clips whose elements all passed in one bundle are
    written before it.
    """

    def __init__(self, output: str, window_seconds: Optional[float] = None):
        super().__init__()
        self.output = output
        self.window_seconds = window_seconds

    def expand(self, pcoll):
        return (
            pcoll
            | "WritePreviews" >> beam.ParDo(_WritePreviews(self.output))
            | "WriteCompleteInBundle" >> beam.ParDo(_WriteCompleteInBundle(self.output, self.window_seconds))
            | "ByClip" >> beam.Map(lambda e: (e.clip_id, e)).with_output_types(typehints.Tuple[str, typehints.Any])
            | "Gather" >> beam.Reshuffle()
            | "WriteWhenComplete" >> beam.ParDo(_WriteWhenComplete(self.output, self.window_seconds))
        )
