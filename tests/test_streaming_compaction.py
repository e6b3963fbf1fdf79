"""Issue 21, point 3: on a streaming output, ``compact`` merges only partitions closed past the job's
lateness horizon, a clip written later than that goes to the current partition, and a watch job running
while ``compact`` runs loses nothing and leaves every window once."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
from clips import make_clip

from beam_captions.cli import compact
from beam_captions.io.compaction import list_caption_files
from beam_captions.io.partitions import TimePartitions, write_settings
from beam_captions.io.read_captions import read_captions
from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
from beam_captions.arrival import time_partition
from beam_captions.io.clip_output import write_clip

T0 = 1_795_000_020  # 2026-11-18T11:07:00Z, a minute boundary


def elements(name: str, found_at: float, windows: int = 2) -> list:
    source = f"/videos/{name}.mp4"
    clip_id = clip_id_for(source)
    records = [WindowRecord(clip_id, source, i, i * 10, i * 10 + 9, i, i + 1.0, (i * 10,), caption=f"{name} {i}",
                            source_version=(1, 1.0)) for i in range(windows)]
    return [*records, ClipInfo(clip_id, source, 64, 48, 10.0, windows * 10, "h264", windows * 1.0, windows,
                               found_at=found_at, source_version=(1, 1.0))]


def test_a_clip_written_past_the_horizon_goes_to_the_current_partition():
    partitions = TimePartitions(60, lateness_horizon_s=600)
    clip = elements("late", T0 + 5)
    assert time_partition(clip, partitions, now=T0 + 60 + 599) == "window=2026-11-18T11-07-00Z"  # still open
    assert time_partition(clip, partitions, now=T0 + 60 + 600) == "window=2026-11-18T11-18-00Z"  # closed: now's
    assert time_partition(clip, TimePartitions(60), now=T0 + 10**6) == "window=2026-11-18T11-07-00Z"  # no horizon
    assert partitions.is_closed("window=2026-11-18T11-07-00Z", now=T0 + 660)
    assert not partitions.is_closed("window=2026-11-18T11-07-00Z", now=T0 + 659)


def test_compact_merges_closed_partitions_only(tmp_path):
    out = str(tmp_path / "out")
    now = time.time()
    write_settings(out, TimePartitions(60, lateness_horizon_s=600))
    partitions = TimePartitions(60, lateness_horizon_s=600)
    for number in range(3):
        for found_at in (now - 7200, now):  # two hours ago (closed) and now (open)
            clip = elements(f"c{number}-{int(found_at)}", found_at)
            written_at = found_at + 1  # as the job wrote it then
            write_clip(out, clip[0].clip_id, clip, partition=time_partition(clip, partitions, now=written_at))
    before = read_captions(out).to_pylist()
    counts = compact([out])
    by_partition: dict[str, list[str]] = {}
    for item in list_caption_files(out):
        by_partition.setdefault(item.partition, []).append(os.path.basename(item.relpath))
    assert len(by_partition) == 2 and counts["files_written"] == 1
    closed, current = sorted(by_partition, key=lambda p: p)
    assert [name.startswith("part-") for name in by_partition[closed]] == [True]
    assert len(by_partition[current]) == 3 and not any(name.startswith("part-") for name in by_partition[current])
    assert sorted(map(str, read_captions(out).to_pylist())) == sorted(map(str, before))


def test_a_watch_job_running_while_compact_runs_loses_nothing(tmp_path, real_clips_dir):
    """A previews-only streaming job (2 s windows, 2 s horizon) watches a folder that gets a clip every
    second, while ``compact`` runs again and again. Every clip ends with its rows once, through the
    metas reader during the run and through a plain read after a last compaction."""
    watched, out, staging = tmp_path / "watched", tmp_path / "out", tmp_path / "staging"
    watched.mkdir()
    staging.mkdir()
    command = [sys.executable, "-m", "beam_captions", "--streaming", "--input", str(watched), "--output", str(out),
               "--watch-interval-seconds", "0.5", "--window-seconds", "2", "--lateness-horizon-seconds", "2",
               "--generate-previews", "--captioning-window-size", "16", "--captioning-remainder-threshold", "8",
               "--preview-target-height", "32", "--preview-target-fps", "2", "--no-gallery"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    names, merged_during = [], 0
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(out / "captions" / "_streaming.json"):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.5)
        for number in range(10):
            name = f"clip{number}.mp4"
            make_clip(str(staging / name), 24 + 4 * (number % 3), 10.0, 64, 48)
            os.replace(staging / name, watched / name)  # the watcher never sees half a file
            names.append(name)
            time.sleep(1)
            if number % 3 == 2:
                merged_during += compact([str(out)]).get("files_written", 0)
                rows = read_captions(str(out)).to_pylist()
                keys = [(r["clip_id"], r["window_index"]) for r in rows]
                assert len(keys) == len(set(keys)), "a window read twice during the run"
        while len(glob.glob(str(out / "metas" / "*.json"))) < len(names):
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "clips were not written within three minutes"
            time.sleep(0.5)
        merged_during += compact([str(out)]).get("files_written", 0)
    finally:
        job.send_signal(signal.SIGTERM)
        log, _ = job.communicate(timeout=60)
    assert "beam-captions: stopped" in log, log[-3000:]
    assert merged_during >= 1, "no partition closed while the job ran: the test did not test the race"
    metas = [json.load(open(p)) for p in glob.glob(str(out / "metas" / "*.json"))]
    assert sorted(os.path.basename(m["source"]) for m in metas) == sorted(names)
    expected = {(m["clip_id"], w["window_index"]) for m in metas for w in m["windows"]}
    rows = read_captions(str(out)).to_pylist()
    assert sorted((r["clip_id"], r["window_index"]) for r in rows) == sorted(expected)
    compact([str(out)])
    plain = pq.read_table(str(out / "captions")).to_pylist()
    assert sorted((r["clip_id"], r["window_index"]) for r in plain) == sorted(expected)
