"""The writer's memory stays bounded (issue 21 §7) and it still writes each clip once: the in-bundle
writer remembers only its recent clips, and the keyed write decides completeness from a small state
(distinct window indices) instead of reading its whole buffer back for every element."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
import pickle

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import GlobalWindow, TimestampedValue

from beam_captions.records import ClipInfo, Failure, WindowRecord, clip_id_for
from beam_captions.transforms import write
from beam_captions.transforms.write import WriteOutputs, _WriteCompleteInBundle, _WriteWhenComplete
from beam_captions.arrival import clip_complete

T0 = 1_795_000_020
VERSION = (1000, float(T0))


def clip_elements(name: str, windows: int = 3, version=VERSION) -> list:
    """``windows`` captioned windows then the ``ClipInfo`` of one clip, all of one source version."""
    source = f"/videos/{name}.mp4"
    clip_id = clip_id_for(source)
    records = [WindowRecord(clip_id, source, i, i * 10, i * 10 + 9, i, i + 1.0, (i * 10, i * 10 + 9),
                            caption=f"{name} {i}", source_version=version) for i in range(windows)]
    info = ClipInfo(clip_id, source, 64, 48, 10.0, windows * 10, "h264", windows * 1.0, windows, found_at=T0,
                    source_version=version)
    return [*records, info]


def test_the_in_bundle_writer_remembers_only_its_recent_clips(tmp_path, monkeypatch):
    monkeypatch.setattr(write, "RECENTLY_WRITTEN_CLIPS", 3)
    writer = _WriteCompleteInBundle(str(tmp_path), None)
    writer.setup()
    writer.start_bundle()
    clips = [clip_elements(f"clip{i}", 1) for i in range(5)]
    for elements in clips:
        for element in elements:
            list(writer.process(element, T0, GlobalWindow()))
    assert len(glob.glob(str(tmp_path / "metas" / "*.json"))) == 5
    assert len(writer.written) == 3  # not 5: the two oldest are forgotten
    assert [e[0].clip_id in writer.written for e in clips] == [False, False, True, True, True]
    assert list(writer.process(clips[-1][0], T0, GlobalWindow())) == []  # a recent duplicate is still dropped
    assert clips[-1][0].clip_id not in writer.held
    list(writer.process(clips[0][0], T0, GlobalWindow()))  # a forgotten one is held for the keyed write
    assert clips[0][0].clip_id in writer.held


def test_the_bound_is_ten_thousand_clips(tmp_path):
    writer = _WriteCompleteInBundle(str(tmp_path), None)
    writer.setup()
    assert writer.written.limit == write.RECENTLY_WRITTEN_CLIPS == 10_000


class _Bag:
    """A bag state as a runner keeps it: values stored encoded; counts its reads."""

    def __init__(self):
        self.values, self.reads = [], 0

    def add(self, value):
        self.values.append(pickle.dumps(value))

    def read(self):
        self.reads += 1
        return iter([pickle.loads(v) for v in self.values])

    def clear(self):
        self.values = []


class _Value:
    """A read-modify-write state as a runner keeps it: what is read is a copy, only ``write`` keeps a change."""

    def __init__(self):
        self.value = None

    def read(self):
        return None if self.value is None else pickle.loads(self.value)

    def write(self, value):
        self.value = pickle.dumps(value)

    def clear(self):
        self.value = None


class _Timer:
    def set(self, timestamp):
        self.at = timestamp


FLUSH = object()


def _drive(order, monkeypatch) -> tuple[list, _Bag, int]:
    """Feed ``order`` to the keyed write with fresh state; the elements of each write_clip call, the bag,
    and after how many elements the write came."""
    writes: list = []
    monkeypatch.setattr(write, "write_clip", lambda output, clip_id, elements, *rest: writes.append(elements) or True)
    keyed = _WriteWhenComplete("unused", None)
    bag, arrived, written, timer = _Bag(), _Value(), _Value(), _Timer()
    written_after = None
    for n, element in enumerate(order, 1):
        if element is FLUSH:  # the end of the window: what arrived is written, incomplete
            keyed.flush(order[0].clip_id, bag, arrived, written)
        else:
            keyed.process((element.clip_id, element), GlobalWindow(), bag, arrived, written, timer)
        if writes and written_after is None:
            written_after = n
    return writes, bag, written_after


def _window_key(element):
    return (type(element).__name__, getattr(element, "window_index", None), getattr(element, "stage", None))


def test_the_keyed_write_writes_a_clip_once_in_any_order_with_a_duplicated_window(monkeypatch):
    elements = clip_elements("any-order")
    duplicate = elements[1]  # window 1 delivered twice
    orders = set(itertools.permutations(range(len(elements) + 1)))
    for order in sorted(orders):
        arriving = [(elements + [duplicate])[i] for i in order]
        writes, bag, written_after = _drive(arriving, monkeypatch)
        assert len(writes) == 1, order
        # written as soon as the last distinct element came, never before, from one read of the buffer
        distinct_seen = [len({_window_key(e) for e in arriving[:n]}) for n in range(1, len(arriving) + 1)]
        assert written_after == distinct_seen.index(len(elements)) + 1, order
        assert sorted({_window_key(e) for e in writes[0]}) == sorted(_window_key(e) for e in elements), order
        assert bag.reads == 1 and bag.values == [], order


def test_a_prepare_failure_completes_a_clip_with_the_windows_it_gave(monkeypatch):
    windows = clip_elements("cut-short", 2)[:2]
    failed = Failure(windows[0].source, windows[0].clip_id, "prepare", "ValueError", "broken packet",
                     windows_before=2, found_at=T0, source_version=VERSION)
    for order in itertools.permutations([*windows, failed, windows[0]]):
        writes, bag, _ = _drive(list(order), monkeypatch)
        assert len(writes) == 1 and bag.reads == 1


def test_a_written_marker_drops_its_delivery_and_keeps_the_count_of_another_version(monkeypatch):
    """The bundle that decoded version A wrote it (``_Written``): A's elements buffered here go, and version
    B's (a replaced file) are counted from themselves alone."""
    a = clip_elements("replaced", 2)
    b = clip_elements("replaced", 2, version=(2000, T0 + 60.0))
    marker = write.Written(a[0].clip_id, VERSION)
    for order in ([a[0], a[1], b[0], marker, b[2], b[1]], [a[0], a[1], marker, b[2], b[0], b[1]]):
        writes, bag, written_after = _drive(order, monkeypatch)
        assert len(writes) == 1 and written_after == 6
        assert {e.source_version for e in writes[0]} == {b[0].source_version} and len(writes[0]) == 3


def test_after_the_end_of_window_flush_a_new_version_is_counted_from_itself(monkeypatch):
    a = clip_elements("flushed", 2)
    b = clip_elements("flushed", 2, version=(2000, T0 + 60.0))
    writes, bag, _ = _drive([a[1], FLUSH, b[2], b[0], b[1]], monkeypatch)
    assert [len(w) for w in writes] == [2, 3]  # window 1 and the write failure; then all of version B
    assert {e.source_version for e in writes[1]} == {b[0].source_version}


def _clip_complete_as_it_was(elements) -> bool:
    """The definition the keyed write's state must agree with (read back from all the elements)."""
    windows = {e.window_index for e in elements if isinstance(e, WindowRecord)}
    return any((isinstance(e, ClipInfo) and len(windows) >= e.num_windows)
               or (isinstance(e, Failure) and e.stage == "prepare" and len(windows) >= e.windows_before)
               for e in elements)


def test_completeness_from_the_small_state_is_the_definition():
    windows = clip_elements("defined", 4)[:4]
    info = clip_elements("defined", 4)[4]
    pieces = [*windows, windows[2], info, dataclasses.replace(info, num_windows=2),
              Failure(info.source, info.clip_id, "prepare", "E", "m", windows_before=3),
              Failure(info.source, info.clip_id, "caption", "E", "m", window_index=1)]
    for size in range(len(pieces) + 1):
        for chosen in itertools.combinations(pieces, size):
            assert clip_complete(chosen) == _clip_complete_as_it_was(chosen), chosen


def test_through_the_pipeline_a_clip_arriving_piece_by_piece_out_of_order_is_written_once(tmp_path, monkeypatch):
    out = str(tmp_path)
    writes = []
    real_write = write.write_clip
    monkeypatch.setattr(write, "write_clip", lambda *args, **kwargs: writes.append(args[1]) or real_write(*args, **kwargs))
    elements = clip_elements("pieces")
    arriving = [elements[2], elements[1], elements[3], elements[1], elements[0]]  # info before the last window
    stream = TestStream().advance_watermark_to(T0)
    for element in arriving:  # one bundle each: only the keyed write sees the clip whole
        stream = stream.add_elements([TimestampedValue(element, T0 + 5)])
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        pipeline | stream.advance_watermark_to_infinity() | WriteOutputs(out, window_seconds=60)
    assert writes == [elements[0].clip_id]
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    assert sorted(r["window_index"] for r in rows) == [0, 1, 2]
    (meta,) = [json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json"))]
    assert meta["status"] == "done" and meta["errors"] == []
