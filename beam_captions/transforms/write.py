"""WriteOutputs: Parquet rows, previews, per-clip metas and failure records under one output root.

The writer DoFns and their Beam glue; one clip's files: ``io.clip_output``; completeness and duplicates:
``arrival``; the skip filter before decoding: ``transforms.skip_finished``."""

from __future__ import annotations

from typing import Any, Optional, Union

import apache_beam as beam
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.windowed_value import WindowedValue

from beam_captions.arrival import (
    RECENTLY_WRITTEN_CLIPS, Arrival, RecentlyWritten, Written, clip_complete, same_delivery, time_partition, version_of,
)
from beam_captions.io.clip_output import write_clip
from beam_captions.io.delta import DELTA, PARQUET
from beam_captions.io.files import write_bytes
from beam_captions.io.partitions import TimePartitions
from beam_captions.io.paths import preview_path
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
            yield element.replace(preview_webp=None).with_failure(failure_from_exception(
                error, source=element.source, clip_id=element.clip_id, stage="write", window_index=element.window_index
            ))
            return
        count("previews")
        yield element.replace(preview_webp=None, preview_uri=path)


class _WriteCompleteInBundle(beam.DoFn):
    """Writes each clip as soon as all its elements have passed in this bundle; hands on the elements
    of clips it has not seen whole when the bundle ends (to ``_WriteWhenComplete``), and a ``Written``
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
        self.written = RecentlyWritten(RECENTLY_WRITTEN_CLIPS)

    def start_bundle(self) -> None:
        self.held = {}

    def process(self, element: Element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        written = self.written.get(element.clip_id)
        if written is not None and element.clip_id not in self.held and same_delivery(written, element):
            count("duplicates_dropped")
            return
        held = self.held.setdefault(element.clip_id, [])
        held.append(WindowedValue(element, timestamp, [window]))
        arrived = [value.value for value in held]
        if clip_complete(arrived):
            write_clip(self.output, element.clip_id, arrived, time_partition(arrived, self.partitions), self.asked,
                       self.captions_table)
            del self.held[element.clip_id]
            version = version_of(arrived)
            self.written[element.clip_id] = (version,)
            yield Written(element.clip_id, version)

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
    by a ``Written`` marker, in the bundle that made it): later elements of that source version
    (a duplicate delivery) are dropped, so they never overwrite the complete result.
    """

    BUFFER = BagStateSpec("elements", PickleCoder())
    ARRIVED = ReadModifyWriteStateSpec("arrived", PickleCoder())  # the buffer's ``Arrival``: no re-read per element
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
        if isinstance(element, Written):  # once per clip: the buffer is read and rewritten here only
            written.write((element.source_version,))
            before = list(buffer.read())
            kept = [e for e in before if not same_delivery((element.source_version,), e)]
            if len(kept) < len(before):
                count("duplicates_dropped")
            buffer.clear()
            arrived.clear()
            for e in kept:
                buffer.add(e)
            if kept:
                arrived.write(Arrival.of(kept))
            return
        done = written.read()
        if done is not None and same_delivery(done, element):
            count("duplicates_dropped")
            return
        buffer.add(element)
        arrival = arrived.read() or Arrival()
        arrival.add(element)
        if arrival.complete:  # the buffer is read once per clip, when it is complete (as clip_complete says)
            elements = list(buffer.read())
            write_clip(self.output, clip_id, elements, time_partition(elements, self.partitions), self.asked,
                       self.captions_table)
            written.write((version_of(elements),))
            buffer.clear()
            arrived.clear()
            return [Written(clip_id, version_of(elements))]  # for the Delta committer (a list: no generator)
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
            written.write((version_of(elements),))
            buffer.clear()
            return [Written(key, version_of(elements))]  # for the Delta committer
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
    clip's rows and write its metas as above; every clip they wrote (``Written``) goes to one committer
    step (``CommitToDelta``), which commits them in batches, one Delta transaction each. ``delta_commit=False``
    leaves that step out: a committer outside the pipeline commits (the launcher's ``CommitLoop``).
    """

    def __init__(self, output: str, window_seconds: Optional[float] = None, asked: Optional[dict[str, Any]] = None,
                 accelerator: Optional[str] = None, lateness_horizon_s: Optional[float] = None,
                 captions_table: str = PARQUET, delta_commit: bool = True):
        super().__init__()
        self.output = output
        self.delta_commit = delta_commit
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
        if table != DELTA or not self.delta_commit:
            return keyed
        from beam_captions.transforms.delta_commit import CommitToDelta

        return (
            (in_bundle | "WrittenInBundle" >> beam.Filter(lambda e: isinstance(e, Written)), keyed)
            | "Written" >> beam.Flatten()
            | "CommitToDelta" >> CommitToDelta(self.output)
        )
