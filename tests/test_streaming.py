"""Streaming: event-time partitions of the Parquet write (TestStream), a live watched folder, notifications."""

from __future__ import annotations

import glob
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from audit import audit
from clips import make_clip

from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
from beam_captions.transforms.notifications import clip_uri_from_notification
from beam_captions.transforms.write import WriteOutputs
from conftest import VLLM_KWARGS

T0 = 1_795_000_020  # 2026-11-18T11:07:00Z, a minute boundary


def clip_elements(name: str, windows: int, found_at: float) -> list:
    source = f"/videos/{name}.mp4"
    clip_id = clip_id_for(source)
    records = [WindowRecord(clip_id, source, i, i * 10, i * 10 + 9, i, i + 1.0, (i * 10, i * 10 + 9), caption=f"{name} {i}")
               for i in range(windows)]
    info = ClipInfo(clip_id, source, 64, 48, 10.0, windows * 10, "h264", windows * 1.0, windows, found_at=found_at)
    return [*records, info]


def test_clips_in_two_windows_land_in_two_sets_of_files_and_a_late_clip_is_kept(tmp_path):
    out = str(tmp_path)
    stream = (
        TestStream()
        .advance_watermark_to(T0)
        .add_elements([TimestampedValue(e, T0 + 5) for e in clip_elements("first", 2, T0 + 5)])
        .add_elements([TimestampedValue(e, T0 + 65) for e in clip_elements("second", 3, T0 + 65)])
        .advance_watermark_to(T0 + 200)
        .add_elements([TimestampedValue(e, T0 + 30) for e in clip_elements("late", 1, T0 + 30)])  # behind the watermark
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        p | stream | WriteOutputs(out, window_seconds=60)
    partitions = {os.path.basename(d): sorted(os.listdir(d)) for d in glob.glob(os.path.join(out, "captions", "window=*"))}
    first_window, second_window = "window=2026-11-18T11-07-00Z", "window=2026-11-18T11-08-00Z"
    assert set(partitions) == {first_window, second_window}
    ids = {name: clip_id_for(f"/videos/{name}.mp4") for name in ("first", "second", "late")}
    assert partitions[first_window] == sorted([f"{ids['first']}.parquet", f"{ids['late']}.parquet"])
    assert partitions[second_window] == [f"{ids['second']}.parquet"]
    table = pq.read_table(os.path.join(out, "captions"))
    assert table.num_rows == 6  # hive-style folders become a "window" column
    assert set(table["window"].to_pylist()) == {"2026-11-18T11-07-00Z", "2026-11-18T11-08-00Z"}
    assert len(glob.glob(os.path.join(out, "metas", "*.json"))) == 3


@pytest.mark.parametrize("attributes, data, expected", [
    ({"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "raw/a b.mp4"}, b"", ("gs://b/raw/a b.mp4", "clip")),
    ({"eventType": "OBJECT_FINALIZE"}, json.dumps({"bucket": "b", "name": "x/clip.MOV"}).encode(), ("gs://b/x/clip.MOV", "clip")),
    ({"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "notes.txt"}, b"", (None, "not_video")),
    ({"eventType": "OBJECT_DELETE", "bucketId": "b", "objectId": "a.mp4"}, b"", (None, "event_object_delete")),
    ({"eventType": "OBJECT_METADATA_UPDATE", "bucketId": "b", "objectId": "a.mp4"}, b"", (None, "event_object_metadata_update")),
    ({"eventType": "OBJECT_FINALIZE"}, b"{not json", (None, "unreadable")),
    ({}, b"", (None, "event_unknown")),
])
def test_bucket_notifications_are_parsed(attributes, data, expected):
    assert clip_uri_from_notification(attributes, data) == expected


def test_a_live_streaming_job_captions_clips_dropped_into_its_folder(tmp_path, captioner_dir, real_clips_dir):
    watched, out = tmp_path / "watched", tmp_path / "out"
    watched.mkdir()
    command = [sys.executable, "-m", "beam_captions", "--streaming", "--input", str(watched), "--output", str(out),
               "--watch-interval-seconds", "1", "--window-seconds", "5", "--generate-previews", "--generate-captions",
               "--model-dir", captioner_dir, "--captioning-window-size", "64", "--captioning-remainder-threshold", "32",
               "--captioning-max-output-tokens", "8", "--vllm-kwargs", json.dumps(VLLM_KWARGS)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)
        names = ["carphone_pristine.mp4", "bikes.mp4"]
        for name in names:  # copied, then renamed into place so the watcher never sees half a file
            data = open(os.path.join(real_clips_dir, name), "rb").read()
            open(watched / f".{name}.part", "wb").write(data)
            os.replace(watched / f".{name}.part", watched / name)
            time.sleep(2)
        deadline = time.monotonic() + 240
        while len(glob.glob(str(out / "metas" / "*.json"))) < len(names):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "clips were not captioned within four minutes"
            time.sleep(1)
        time.sleep(3)  # one more poll of the folder: nothing may be processed twice
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert "beam-captions: stopped" in output
    audit(str(out), output)  # the stopped run's summary adds up and its table is its metas' windows
    metas = [json.load(open(p)) for p in glob.glob(str(out / "metas" / "*.json"))]
    assert sorted(os.path.basename(m["source"]) for m in metas) == sorted(names)
    rows = pq.read_table(str(out / "captions")).to_pylist()
    keys = [(r["clip_id"], r["window_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == sum(len(m["windows"]) for m in metas)
    assert all(r["caption"] and os.path.isfile(r["preview"]) for r in rows)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", r["window"]) for r in rows)


def _place(clip: str, target) -> tuple[int, float]:
    """Copy ``clip`` into the watched folder as ``target``, under a temporary name then renamed into place
    (the watcher never sees half a file); returns the version the watcher lists: (size, mtime)."""
    part = target.parent / f".{target.name}.part"
    shutil.copyfile(clip, part)
    os.replace(part, target)
    found = os.stat(target)
    return found.st_size, found.st_mtime


def _metas_when(out, ready, timeout_s: float, process) -> dict:
    """The one metas of ``out`` once ``ready(metas)`` holds (the job must keep running meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = glob.glob(str(out / "metas" / "*.json"))
        if found:
            try:
                meta = json.load(open(found[0]))
            except ValueError:  # being written
                meta = None
            if meta is not None and ready(meta):
                return meta
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"not within {timeout_s} s; metas: {found and open(found[0]).read()}"
        time.sleep(0.2)


def test_a_watched_file_replaced_while_the_job_runs_is_redone(tmp_path):
    """Issue 21 §7: a file replaced under the watched folder (new content, new mtime) is listed again and
    redone, as a batch run redoes it: the output ends with the new version's windows and source version."""
    watched, out = tmp_path / "watched", tmp_path / "out"
    watched.mkdir()
    first = make_clip(str(tmp_path / "first.mp4"), 16, 8.0, 64, 48)  # one window
    second = make_clip(str(tmp_path / "second.mp4"), 40, 8.0, 64, 48)  # three windows (16 + 16 + 8)
    command = [sys.executable, "-m", "beam_captions", "--streaming", "--input", str(watched), "--output", str(out),
               "--watch-interval-seconds", "0.5", "--window-seconds", "5", "--generate-previews",
               "--preview-target-height", "32", "--captioning-window-size", "16",
               "--captioning-remainder-threshold", "8", "--no-gallery"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        target = watched / "clip.mp4"
        old = _place(first, target)
        _metas_when(out, lambda m: m["source_version"] == {"size": old[0], "modified": old[1]}, 120, process)
        time.sleep(1.1)  # a later mtime, whatever the filesystem's resolution
        new = _place(second, target)
        assert new != old
        meta = _metas_when(out, lambda m: m["source_version"] == {"size": new[0], "modified": new[1]}, 60, process)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert meta["status"] == "done" and len(meta["windows"]) == 3, meta
    audit(str(out), output)
    rows = pq.read_table(str(out / "captions")).to_pylist()
    assert sorted(r["window_index"] for r in rows) == [0, 1, 2], output[-3000:]  # the first version's row is gone
    [log] = glob.glob(str(out / "logs" / "*.log"))
    log = open(log).read()  # a local streaming run: the FnApiRunner, Prism never tried (issue 31)
    assert "local runner: FnApiRunner (Prism off)" in log and "PrismRunner" not in log
    assert sorted(os.listdir(out / "previews" / meta["clip_id"])) == sorted(
        os.path.basename(w["preview"]) for w in meta["windows"])


def test_a_clip_delivered_twice_is_written_once(tmp_path):
    from beam_captions.io.clip_output import write_clip

    elements = clip_elements("twice", 2, T0)
    write_clip(str(tmp_path), elements[0].clip_id, elements + elements)
    rows = pq.read_table(str(tmp_path / "captions")).to_pylist()
    assert [r["window_index"] for r in rows] == [0, 1]
    assert len(json.load(open(glob.glob(str(tmp_path / "metas" / "*.json"))[0]))["windows"]) == 2


def streaming_options() -> PipelineOptions:
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return options


def test_a_late_partial_duplicate_never_overwrites_the_written_clip(tmp_path):
    """Issue 14 §3: a clip delivered twice (two notifications, a re-list) through the pipeline: the second,
    partial delivery (one window with another caption, no ClipInfo) is flushed at drain and must not
    replace the complete result."""
    out = str(tmp_path)
    complete = clip_elements("twice", 3, T0 + 5)
    duplicate = [complete[0].replace(caption="from the duplicate")]
    stream = (
        TestStream()
        .advance_watermark_to(T0)
        .add_elements([TimestampedValue(e, T0 + 5) for e in complete])
        .advance_watermark_to(T0 + 120)
        .add_elements([TimestampedValue(e, T0 + 125) for e in duplicate])
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=streaming_options()) as p:
        p | stream | WriteOutputs(out, window_seconds=60)
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    assert [r["caption"] for r in rows] == ["twice 0", "twice 1", "twice 2"]
    (meta_file,) = glob.glob(os.path.join(out, "metas", "*.json"))
    document = json.load(open(meta_file))
    assert document["status"] == "done" and document["errors"] == [] and len(document["windows"]) == 3
    assert glob.glob(os.path.join(out, "failures", "*")) == []


def test_a_complete_duplicate_rewrites_nothing_different(tmp_path):
    out = str(tmp_path)
    elements = clip_elements("again", 2, T0 + 5)
    stream = (
        TestStream()
        .advance_watermark_to(T0)
        .add_elements([TimestampedValue(e, T0 + 5) for e in elements])
        .advance_watermark_to(T0 + 120)
        .add_elements([TimestampedValue(e, T0 + 125) for e in elements[::-1]])
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=streaming_options()) as p:
        p | stream | WriteOutputs(out, window_seconds=60)
    files = sorted(os.path.relpath(f, out) for f in glob.glob(os.path.join(out, "**", "*.*"), recursive=True))
    clip_id = elements[0].clip_id
    markers = [f for f in files if f.startswith("done/")]  # the done index: one marker for the clip's metas
    assert len(markers) == 1 and markers[0].startswith(f"done/{clip_id}.")
    assert [f for f in files if f not in markers] == [
        f"captions/window=2026-11-18T11-07-00Z/{clip_id}.parquet", f"metas/{clip_id}.json"]
    assert pq.read_table(os.path.join(out, "captions")).num_rows == 2


def test_a_clip_written_again_in_another_window_leaves_no_rows_in_the_first(tmp_path):
    """Issue 14 §2: streaming with --no-skip-existing must not duplicate a clip's rows in a second window= partition."""
    out = str(tmp_path)
    for found_at in (T0 + 5, T0 + 65):  # two runs (or a re-list) see the same clip in two event-time windows
        stream = (TestStream().advance_watermark_to(T0)
                  .add_elements([TimestampedValue(e, found_at) for e in clip_elements("twice", 2, found_at)])
                  .advance_watermark_to_infinity())
        with TestPipeline(options=streaming_options()) as p:
            p | stream | WriteOutputs(out, window_seconds=60)
    clip_id = clip_id_for("/videos/twice.mp4")
    assert [os.path.relpath(f, out) for f in glob.glob(os.path.join(out, "captions", "*", "*.parquet"))] == [
        f"captions/window=2026-11-18T11-08-00Z/{clip_id}.parquet"]
    assert pq.read_table(os.path.join(out, "captions")).num_rows == 2
    assert json.load(open(os.path.join(out, "metas", f"{clip_id}.json")))["captions_file"] == (
        f"captions/window=2026-11-18T11-08-00Z/{clip_id}.parquet")
