"""P9: reading a whole captions table of many clips after ``beam-captions compact`` / before it, on both
table formats (``--captions-table parquet``, the default, and ``delta``).

P9 (plain Parquet): an output of ``clips`` clips (1 to 4 windows each, ~60-word captions) is made through
the real writer (``write_clip``: one Parquet file and one metas per clip, as a caption run leaves them);
then ``beam-captions compact`` (the Beam job, DirectRunner) merges it. The figure is the wall time of
``pyarrow.parquet.read_table(OUT/captions)`` on the compacted copy over the same read of the uncompacted
one (interleaved repeats); the details carry files before/after, the compaction's wall time, and that
both reads give the same rows.

P9d (Delta Lake): the same clips through the writer in delta mode (staged rows, metas), committed as a
job's committer does (batches of ``io.delta.BATCH_CLIPS``, one data file each); then ``beam-captions
compact`` (delta-rs's optimize, then vacuum with no retention). The figure is the wall time of
``DeltaTable(OUT/captions).to_pyarrow_table()`` compacted over as written.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import pyarrow.parquet as pq

from common import Figure, interleaved, median_ratio

WORDS = ("a person walks past a red car while the camera pans slowly to the left and a dog runs across "
         "the wet street under grey clouds near an old brick building with tall windows").split()


def make_output(out: str, clips: int, captions_table: str = "parquet") -> None:
    from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
    from beam_captions.io.clip_output import write_clip

    for number in range(clips):
        source = f"/videos/clip-{number:06d}.mp4"
        clip_id, version, windows = clip_id_for(source), (1000 + number, 1.0), 1 + number % 4
        caption = " ".join(WORDS[(number + i) % len(WORDS)] for i in range(60))
        elements = [WindowRecord(clip_id, source, i, i * 256, i * 256 + 255, i * 8.5, i * 8.5 + 8.5,
                                 tuple(range(i * 256, i * 256 + 256, 32)), caption=f"{i}: {caption}",
                                 caption_model="Qwen/Qwen2.5-VL-7B-Instruct", caption_prompt_tokens=3040,
                                 source_version=version) for i in range(windows)]
        elements.append(ClipInfo(clip_id, source, 1920, 1080, 30.0, windows * 256, "h264", windows * 8.5, windows,
                                 source_version=version))
        write_clip(out, clip_id, elements, asked={"captions": {"model": "m"}}, captions_table=captions_table)


def read_seconds(out: str) -> float:
    start = time.perf_counter()
    pq.read_table(os.path.join(out, "captions"))
    return time.perf_counter() - start


def count_files(out: str) -> int:
    return sum(name.endswith(".parquet") for _, _, names in os.walk(os.path.join(out, "captions")) for name in names)


def run(clips: int, repeats: int) -> list[Figure]:
    return [run_parquet(clips, repeats), run_delta(clips, repeats)]


def run_parquet(clips: int, repeats: int) -> Figure:
    from beam_captions.cli import compact

    figure = Figure("P9", f"read the captions table of {clips} clips: compacted / as written", "read s", ("<=", 0.2))
    root = tempfile.mkdtemp(prefix="p9-")
    try:
        written, compacted = os.path.join(root, "written"), os.path.join(root, "compacted")
        start = time.perf_counter()
        make_output(written, clips)
        write_s = time.perf_counter() - start
        shutil.copytree(written, compacted)
        start = time.perf_counter()
        compact([compacted])
        compact_s = time.perf_counter() - start
        same = (pq.read_table(os.path.join(written, "captions")).sort_by([("clip_id", "ascending"),
                                                                          ("window_index", "ascending")])
                .equals(pq.read_table(os.path.join(compacted, "captions")).sort_by(
                    [("clip_id", "ascending"), ("window_index", "ascending")])))
        after, before = interleaved(repeats, lambda: read_seconds(compacted), lambda: read_seconds(written))
        figure.ours, figure.baseline = statistics.median(after), statistics.median(before)
        figure.ratio = median_ratio(after, before)
        figure.details = {
            "clips": clips, "repeats": repeats, "rows_equal": same,
            "files_before": count_files(written), "files_after": count_files(compacted),
            "write_s": round(write_s, 1), "compact_s": round(compact_s, 1),
            "read_after_s": after, "read_before_s": before,
        }
        if not same:
            figure.skipped = "error: the compacted table differs"
        return figure
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _delta_table(out: str):
    from beam_captions.io.delta import read_table

    return read_table(out).sort_by([("clip_id", "ascending"), ("window_index", "ascending")])


def delta_read_seconds(out: str) -> float:
    from deltalake import DeltaTable

    start = time.perf_counter()
    DeltaTable(os.path.join(out, "captions")).to_pyarrow_table()
    return time.perf_counter() - start


def run_delta(clips: int, repeats: int) -> Figure:
    from beam_captions.cli import compact
    from p13_delta_commit import commit_in_batches

    figure = Figure("P9d", f"read the Delta captions table of {clips} clips: compacted / as committed", "read s",
                    ("<=", 1.0))
    root = tempfile.mkdtemp(prefix="p9d-")
    try:
        written, compacted = os.path.join(root, "written"), os.path.join(root, "compacted")
        start = time.perf_counter()
        make_output(written, clips, "delta")
        commits = commit_in_batches(written)
        write_s = time.perf_counter() - start
        shutil.copytree(written, compacted)
        start = time.perf_counter()
        counts = compact([compacted, "--retention-hours", "0"])
        compact_s = time.perf_counter() - start
        same = _delta_table(written).equals(_delta_table(compacted))
        after, before = interleaved(repeats, lambda: delta_read_seconds(compacted), lambda: delta_read_seconds(written))
        figure.ours, figure.baseline = statistics.median(after), statistics.median(before)
        figure.ratio = median_ratio(after, before)
        figure.details = {
            "clips": clips, "repeats": repeats, "rows_equal": same, "commits": commits,
            "files_before": counts["files_before"], "files_after": counts["files_after"],
            "files_vacuumed": counts["files_vacuumed"], "write_and_commit_s": round(write_s, 1),
            "compact_s": round(compact_s, 1), "read_after_s": after, "read_before_s": before,
        }
        if not same:
            figure.skipped = "error: the compacted Delta table differs"
        return figure
    finally:
        shutil.rmtree(root, ignore_errors=True)
