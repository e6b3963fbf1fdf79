"""WriteOutputs: Parquet rows, previews, per-clip metas and failure records under one output root."""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
from typing import Any, Iterable, Optional, Union

import apache_beam as beam
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.compaction import MANIFEST, is_compacted
from beam_captions.io.delta import DELTA, PARQUET, stage_rows
from beam_captions.io.files import delete_quietly, matching, write_bytes, write_json
from beam_captions.io.metas import (
    CAPTION_GROUP, PREVIEW_GROUP, clip_meta, failure_meta, finished_for, merge_windows, read_meta, version_meta,
    window_meta,
)
from beam_captions.io.parquet import caption_row, parquet_bytes
from beam_captions.io.partitions import TimePartitions
from beam_captions.io.paths import (
    caption_table_path, captions_dir, failure_path, failures_dir, meta_path, preview_path, previews_dir,
)
from beam_captions.io.superseded import mark_superseded
from beam_captions.metrics import count
from beam_captions.records import ClipInfo, ClipRef, Failure, WindowRecord, failure_from_exception

__all__ = ["SkipFinishedClips", "WriteOutputs", "clip_complete", "source_version", "time_partition", "write_clip"]

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
            yield element.replace(preview_webp=None).with_failure(failure_from_exception(
                error, source=element.source, clip_id=element.clip_id, stage="write", window_index=element.window_index
            ))
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


def _captions_file(clip_id: str, partition: Optional[str]) -> str:
    """The clip's Parquet file relative to the output root (as recorded in its metas)."""
    return "/".join(["captions", *([partition] if partition else []), f"{clip_id}.parquet"])


def _version_of(elements: list[Element]) -> Optional[tuple[int, float]]:
    for element in elements:
        version = getattr(element, "source_version", None)
        if version is not None:
            return tuple(version)
    return None


def write_clip(
    output: str,
    clip_id: str,
    elements: Iterable[Element],
    partition: Optional[str] = None,
    asked: Optional[dict[str, Any]] = None,
    captions_table: str = PARQUET,
) -> bool:
    """Write one clip's failure records, its Parquet rows, then its metas (the marker that it is done);
    then remove what an earlier write of the clip left that this one replaces. Returns whether it wrote.

    ``captions_table="delta"``: the rows go to a staged file (``io.delta.stage_rows``), which the metas
    names (``captions_staged``) for the job's committer (``CommitToDelta``) to commit to the Delta table;
    a clip written before gets a staged file even without rows, so that its commit removes its old ones.

    ``partition`` (streaming: the event-time window) puts the rows in ``captions/<partition>/``.
    ``asked`` is what the run makes (``outputs`` in the metas): outputs of the clip's earlier metas that
    this run does not make (previews, or captions) are kept if the source is the same version; the rest
    (rows in another partition, previews of windows that are gone, failure records) is replaced. A write
    that is not complete (failures, missing windows) never replaces a complete result of the same source
    version that has every output asked: it is a late duplicate and is dropped.

    A merged file (``compact``) is never changed: a clip whose rows are in one is marked superseded
    there (``io.superseded``) before its own file and metas are written; readers that go through the
    metas (``read_captions``) see its new rows only, and the next compaction drops the old ones.
    """
    asked = dict(asked or {})
    elements = list(elements)
    infos = [e for e in elements if isinstance(e, ClipInfo)]
    by_index: dict[int, WindowRecord] = {}
    for element in elements:  # a window delivered twice (a retried bundle, a re-reported file) counts once
        if isinstance(element, WindowRecord):
            by_index.setdefault(element.window_index, element)
    windows = [by_index[i] for i in sorted(by_index)]
    all_failures = [e for e in elements if isinstance(e, Failure)] + [f for w in windows for f in w.failures]
    failures = list({f.name: f for f in all_failures}.values())
    version = _version_of(elements)
    old = read_meta(output, clip_id)
    same_source = old is not None and (version is None or old.get("source_version") == version_meta(version))
    complete = bool(infos) and not failures
    if not complete and same_source and old.get("status") == "done" and finished_for(old, asked, version, True):
        count("duplicates_dropped")
        return False
    window_metas, outputs = merge_windows([window_meta(w) for w in windows], old if same_source else None, asked)
    before = None
    if old is not None:
        before = old.get("captions_file") if "captions_file" in old else (
            _captions_file(clip_id, None) if old.get("windows") else None)
    if before and is_compacted(before):  # before any new row: a reader then checks this clip's metas
        mark_superseded(output, before, clip_id)
        delete_quietly([FileSystems.join(captions_dir(output), MANIFEST)])  # it no longer lists every file
    for failure in failures:
        count(f"failures_{failure.stage}")
        write_json(failure_path(output, failure.name), failure_meta(failure))
    keep = {f"{failure.name}.json" for failure in failures}
    delete_quietly(m.path for m in matching(FileSystems.join(failures_dir(output), f"{clip_id}_*.json"))
                   if posixpath.basename(m.path.replace(os.sep, "/")) not in keep)
    captions_file = staged = None
    if windows:
        for record in windows:
            _count_row(record)
        rows = []
        for record, merged in zip(windows, window_metas):
            row = caption_row(record)
            row.update({key: merged.get(key) for key in (*CAPTION_GROUP, *PREVIEW_GROUP)})
            rows.append(row)
        if captions_table == DELTA:
            staged = stage_rows(output, clip_id, rows)
        else:
            write_bytes(caption_table_path(output, clip_id, partition), parquet_bytes(rows))
            captions_file = _captions_file(clip_id, partition)
    elif captions_table == DELTA and old is not None:
        staged = stage_rows(output, clip_id, [])  # its commit removes the rows an earlier write committed
    count("clips")
    if not infos:
        count("clips_failed")
    meta = clip_meta(clip_id, elements[0].source, infos[0] if infos else None, window_metas, failures,
                     source_version=version, outputs=outputs, captions_file=captions_file)
    if captions_table == DELTA:  # an earlier metas: rows of the clip may be in the table, the commit replaces them
        meta.update(captions_table=DELTA, captions_staged=staged, captions_replaces=old is not None)
    write_json(meta_path(output, clip_id), meta)
    # after the metas: a crash before this leaves an extra file, never a clip without rows
    if before and before != captions_file and before.endswith(f"/{clip_id}.parquet"):  # the clip's own old file
        delete_quietly([FileSystems.join(output, *before.split("/"))])
    previews = {posixpath.basename(str(w["preview"]).replace(os.sep, "/")) for w in window_metas if w.get("preview")}
    delete_quietly(m.path for m in matching(FileSystems.join(previews_dir(output), clip_id, "*.webp"))
                   if posixpath.basename(m.path.replace(os.sep, "/")) not in previews)
    return True


class _SkipFinished(beam.DoFn):
    """Stamps each ``ClipRef`` with its source's version and drops those an earlier run finished."""

    def __init__(self, output: str, asked: dict[str, Any], skip_existing: bool, retry_failed: bool):
        self.output, self.asked = output, dict(asked)
        self.skip_existing, self.retry_failed = skip_existing, retry_failed

    def process(self, clip: ClipRef):
        if clip.version is None:
            clip = dataclasses.replace(clip, version=source_version(clip.source))
        meta = read_meta(self.output, clip.clip_id)  # also without skip_existing: the summary says why it is redone
        if finished_for(meta, self.asked, clip.version, self.retry_failed):
            if self.skip_existing:
                count("clips_skipped")
                return
            count("clips_not_skipped")  # finished, redone because --no-skip-existing asks
        elif meta is not None:
            if clip.version is not None and meta.get("source_version") not in (None, version_meta(clip.version)):
                count("clips_replaced")
            elif meta.get("status") == "failed":
                count("clips_retried")
            elif all(name in (meta.get("outputs") or {}) for name in self.asked):
                count("clips_other_settings")  # each asked output is there, one made differently
            else:
                count("clips_extended")  # an asked output is missing
        yield clip


def source_version(source: str) -> Optional[tuple[int, float]]:
    """``(size, last modified)`` of ``source`` through Beam's filesystems (local mtime; on gs:// the
    object's update time, which a new generation changes), or ``None`` if it cannot be read."""
    try:
        found = FileSystems.get_filesystem(source).metadata(source)
    except Exception:  # noqa: BLE001 - missing: decoding will say so
        return None
    return int(found.size_in_bytes), float(found.last_updated_in_seconds or 0.0)


class SkipFinishedClips(beam.PTransform):
    """Stamp ``ClipRef``s with their source's version and (``skip_existing``) drop those whose metas
    says they are done for every output ``asked``, from the same source version: failed clips are
    tried again unless ``retry_failed`` is off, replaced files and clips missing an asked output are redone."""

    def __init__(self, output: str, asked: Optional[dict[str, Any]] = None, skip_existing: bool = True,
                 retry_failed: bool = True):
        super().__init__()
        self.output = output
        self.asked = dict(asked or {})
        self.skip_existing, self.retry_failed = skip_existing, retry_failed

    def expand(self, clips):
        return clips | "Unfinished" >> beam.ParDo(
            _SkipFinished(self.output, self.asked, self.skip_existing, self.retry_failed))


class _Arrival:
    """What has arrived of one clip, as far as its completeness goes: the distinct window indices (a
    window delivered twice counts once) and the fewest windows that a ``ClipInfo`` (``num_windows``) or
    a ``prepare`` failure (``windows_before``) says went out (None until one of them arrives).

    Small (ints, never frames), so the keyed write keeps it in its own state and decides completeness
    per element without reading the clip's buffered elements back."""

    __slots__ = ("windows", "needed")

    def __init__(self) -> None:
        self.windows: set[int] = set()
        self.needed: Optional[int] = None

    @classmethod
    def of(cls, elements: Iterable[Element]) -> "_Arrival":
        arrival = cls()
        for element in elements:
            arrival.add(element)
        return arrival

    def add(self, element: Element) -> None:
        if isinstance(element, WindowRecord):
            self.windows.add(element.window_index)
            return
        if isinstance(element, ClipInfo):
            needed = element.num_windows
        elif isinstance(element, Failure) and element.stage == "prepare":
            needed = element.windows_before
        else:
            return
        self.needed = needed if self.needed is None else min(self.needed, needed)

    @property
    def complete(self) -> bool:
        return self.needed is not None and len(self.windows) >= self.needed

    def __getstate__(self):
        return self.windows, self.needed

    def __setstate__(self, state) -> None:
        self.windows, self.needed = state


def clip_complete(elements: Iterable[Element]) -> bool:
    """Whether every element of a clip has arrived: its ``ClipInfo`` (or ``prepare`` failure) and as
    many distinct windows as that says went out."""
    return _Arrival.of(elements).complete


def time_partition(elements: Iterable[Element], partitions: Optional[TimePartitions],
                   now: Optional[float] = None) -> Optional[str]:
    """``window=<UTC start>`` of the fixed event-time window of the clip's arrival (streaming), else ``None``;
    the window of ``now`` (the write) for a clip whose own window closed past the lateness horizon.

    The arrival time travels in the clip's ``ClipInfo`` or ``prepare`` failure: element timestamps
    are not relied on past the model steps, which hand windows on as they finish.
    """
    found = [e.found_at for e in elements if isinstance(e, (ClipInfo, Failure)) and e.found_at is not None]
    if partitions is None or not found:
        return None
    return partitions.for_clip(found[0], now)


@dataclasses.dataclass(frozen=True)
class _Written:
    """Tells the keyed write that a clip (of this source version) was written before it."""

    clip_id: str
    source_version: Optional[tuple[int, float]]


def _same_delivery(written: tuple, element: Element) -> bool:
    """Whether ``element`` belongs to the written delivery: the same, known source version. An element
    whose version is not known is never taken for a duplicate."""
    version = getattr(element, "source_version", None)
    return version is not None and version == written[0]


RECENTLY_WRITTEN_CLIPS = 10_000
"""How many clips each ``_WriteCompleteInBundle`` instance remembers having written (an LRU; some
2 MB of clip ids and versions). A bounded, recent set is enough: a duplicate delivery (a retried
bundle, a file listed or notified twice) arrives close to its original delivery, so the clip is still
among the last ones written; a later duplicate is caught by the keyed write's ``_Written`` state
(per clip, kept by the runner), and an incomplete write never replaces a complete one of the same
source version (``write_clip``). Unbounded, the set would grow with every clip of a streaming job."""


class _RecentlyWritten:
    """The last ``limit`` clips written, by clip id, with what ``_same_delivery`` compares (the least
    recently written or looked-up one is forgotten first)."""

    def __init__(self, limit: int = RECENTLY_WRITTEN_CLIPS):
        self.limit = limit
        self._clips: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def get(self, clip_id: str) -> Optional[tuple]:
        found = self._clips.get(clip_id)
        if found is not None:
            self._clips.move_to_end(clip_id)
        return found

    def __setitem__(self, clip_id: str, written: tuple) -> None:
        self._clips[clip_id] = written
        self._clips.move_to_end(clip_id)
        while len(self._clips) > self.limit:
            self._clips.popitem(last=False)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._clips

    def __len__(self) -> int:
        return len(self._clips)


class _WriteCompleteInBundle(beam.DoFn):
    """Writes each clip as soon as all its elements have passed in this bundle; hands on the elements
    of clips it has not seen whole when the bundle ends (to ``_WriteWhenComplete``), and a ``_Written``
    marker for each clip it wrote, so that the keyed write drops a late duplicate of it.

    Beam's local runner takes a clip from decode to write in one bundle, so there every clip is
    written here, on the worker that made it; where a clip's elements span bundles (Dataflow between
    GPU and CPU steps, streaming) the keyed write completes it.
    """

    def __init__(self, output: str, partitions: Optional[TimePartitions], asked: Optional[dict[str, Any]] = None,
                 captions_table: str = PARQUET):
        self.output = output
        self.partitions = partitions
        self.asked = dict(asked or {})
        self.captions_table = captions_table
        self.held: dict[str, list[WindowedValue]] = {}
        self.written: dict[str, tuple] = {}

    def setup(self) -> None:
        # the clips this instance wrote last: a duplicate delivery it sees again is dropped (bounded: see
        # RECENTLY_WRITTEN_CLIPS; the keyed write's state catches the duplicates that come later)
        self.written = _RecentlyWritten(RECENTLY_WRITTEN_CLIPS)

    def start_bundle(self) -> None:
        self.held = {}

    def process(self, element: Element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        written = self.written.get(element.clip_id)
        if written is not None and element.clip_id not in self.held and _same_delivery(written, element):
            count("duplicates_dropped")
            return
        held = self.held.setdefault(element.clip_id, [])
        held.append(WindowedValue(element, timestamp, [window]))
        arrived = [value.value for value in held]
        if clip_complete(arrived):
            write_clip(self.output, element.clip_id, arrived, time_partition(arrived, self.partitions), self.asked,
                       self.captions_table)
            del self.held[element.clip_id]
            version = _version_of(arrived)
            self.written[element.clip_id] = (version,)
            yield _Written(element.clip_id, version)

    def finish_bundle(self):
        for held in self.held.values():
            yield from held
        self.held = {}


class _WriteWhenComplete(beam.DoFn):
    """Buffers each clip's elements (keyed by clip id) and writes the clip as soon as it is complete.

    Completion is known from the elements themselves, not from a watermark, so a clip's files
    appear as soon as its last window is through, in batch and streaming alike. A clip still
    incomplete when its window ends (batch: the end of input) is written with what arrived and
    a ``write`` failure saying so. Per clip, the state remembers that it was written (here or,
    by a ``_Written`` marker, in the bundle that made it): later elements of that source version
    (a duplicate delivery) are dropped, so they never overwrite the complete result.
    """

    BUFFER = BagStateSpec("elements", PickleCoder())
    ARRIVED = ReadModifyWriteStateSpec("arrived", PickleCoder())  # the buffer's ``_Arrival``: no re-read per element
    WRITTEN = ReadModifyWriteStateSpec("written", PickleCoder())
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, output: str, partitions: Optional[TimePartitions], asked: Optional[dict[str, Any]] = None,
                 captions_table: str = PARQUET):
        self.output = output
        self.partitions = partitions
        self.asked = dict(asked or {})
        self.captions_table = captions_table

    def process(
        self,
        keyed,
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        arrived=beam.DoFn.StateParam(ARRIVED),
        written=beam.DoFn.StateParam(WRITTEN),
        end=beam.DoFn.TimerParam(END),
    ):
        clip_id, element = keyed
        if isinstance(element, _Written):  # once per clip: the buffer is read and rewritten here only
            written.write((element.source_version,))
            before = list(buffer.read())
            kept = [e for e in before if not _same_delivery((element.source_version,), e)]
            if len(kept) < len(before):
                count("duplicates_dropped")
            buffer.clear()
            arrived.clear()
            for e in kept:
                buffer.add(e)
            if kept:
                arrived.write(_Arrival.of(kept))
            return
        done = written.read()
        if done is not None and _same_delivery(done, element):
            count("duplicates_dropped")
            return
        buffer.add(element)
        arrival = arrived.read() or _Arrival()
        arrival.add(element)
        if arrival.complete:  # the buffer is read once per clip, when it is complete (as clip_complete says)
            elements = list(buffer.read())
            write_clip(self.output, clip_id, elements, time_partition(elements, self.partitions), self.asked,
                       self.captions_table)
            written.write((_version_of(elements),))
            buffer.clear()
            arrived.clear()
            return [_Written(clip_id, _version_of(elements))]  # for the Delta committer (a list: no generator)
        else:
            arrived.write(arrival)
            end.set(window.max_timestamp())

    @on_timer(END)
    def flush(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
              arrived=beam.DoFn.StateParam(ARRIVED), written=beam.DoFn.StateParam(WRITTEN)):
        elements = list(buffer.read())
        arrived.clear()
        if not elements:
            return
        missing = RuntimeError("the clip's elements did not all arrive; written with what did")
        elements.append(failure_from_exception(missing, source=elements[0].source, clip_id=key, stage="write"))
        if write_clip(self.output, key, elements, time_partition(elements, self.partitions), self.asked,
                      self.captions_table):
            written.write((_version_of(elements),))
            buffer.clear()
            return [_Written(key, _version_of(elements))]  # for the Delta committer
        buffer.clear()


class WriteOutputs(beam.PTransform):
    """Write everything under ``output`` (local or gs://), clip by clip, as each clip completes.

    ``OUT/previews/<clip>/<start>_<end>.webp`` as windows pass, then per clip
    ``OUT/failures/<clip>_<where>_<stage>.json``, ``OUT/captions/<clip>.parquet`` (one row per
    window) and last ``OUT/metas/<clip>.json``: a clip with a metas file is complete, so a
    killed or retried run never leaves a clip half-written and never duplicates a row.

    Streaming: with ``window_seconds`` the rows go to ``OUT/captions/window=<UTC start>/``, the
    fixed event-time window of the clip's arrival. A clip is written as soon as it is complete,
    never dropped for lateness: a late clip lands in its own (older) window's folder, or, once that
    closed (``lateness_horizon_s`` after its end), in the window of its write (``io.partitions``).

    The keyed write is stateful, and Beam's local runner runs a stateful stage on one worker: the
    ``Gather`` shuffle keeps the steps before it (decoding, previews, captioning) out of that stage,
    so that they run on every local worker, and clips whose elements all passed in one bundle are
    written before it.

    ``accelerator``: the model steps' resource hint, given to the steps that write a clip as its last
    window leaves the model. Dataflow does not fuse steps with different hints, and in a batch job a
    stage starts when the one before it has finished: writes on CPU workers would wait for the last
    clip of the job to be captioned, and a job that failed after hours of GPU time would leave no row.
    With the hint they run in the GPU stage, so each clip is durable as soon as it is captioned.

    ``captions_table="delta"``: ``OUT/captions`` is a Delta table (``io.delta``). The writers stage each
    clip's rows and write its metas as above; every clip they wrote (``_Written``) goes to one committer
    step (``CommitToDelta``), which commits them in batches, one Delta transaction each.
    """

    def __init__(self, output: str, window_seconds: Optional[float] = None, asked: Optional[dict[str, Any]] = None,
                 accelerator: Optional[str] = None, lateness_horizon_s: Optional[float] = None,
                 captions_table: str = PARQUET):
        super().__init__()
        self.output = output
        self.partitions = TimePartitions(window_seconds, lateness_horizon_s) if window_seconds else None
        self.asked = dict(asked or {})
        self.accelerator = accelerator
        self.captions_table = captions_table

    def _on_model_workers(self, step: beam.PTransform) -> beam.PTransform:
        return step.with_resource_hints(accelerator=self.accelerator) if self.accelerator else step

    def expand(self, pcoll):
        table = self.captions_table
        in_bundle = (
            pcoll
            | "WritePreviews" >> self._on_model_workers(beam.ParDo(_WritePreviews(self.output)))
            | "WriteCompleteInBundle" >> self._on_model_workers(
                beam.ParDo(_WriteCompleteInBundle(self.output, self.partitions, self.asked, table)))
        )
        keyed = (
            in_bundle
            | "ByClip" >> beam.Map(lambda e: (e.clip_id, e)).with_output_types(typehints.Tuple[str, typehints.Any])
            | "Gather" >> beam.Reshuffle()
            | "WriteWhenComplete" >> beam.ParDo(_WriteWhenComplete(self.output, self.partitions, self.asked, table))
        )
        if table != DELTA:
            return keyed
        from beam_captions.transforms.delta_commit import CommitToDelta

        return (
            (in_bundle | "WrittenInBundle" >> beam.Filter(lambda e: isinstance(e, _Written)), keyed)
            | "Written" >> beam.Flatten()
            | "CommitToDelta" >> CommitToDelta(self.output)
        )
