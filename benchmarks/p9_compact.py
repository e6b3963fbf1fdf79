"""P9: reading a whole captions table of many clips after ``beam-captions compact`` / before it.

An output of ``clips`` clips (1 to 4 windows each, ~60-word captions) is made through the real writer
(``write_clip``: one Parquet file and one metas per clip, as a caption run leaves them); then
``beam-captions compact`` (the Beam job, DirectRunner) merges it. The figure is the wall time of
``pyarrow.parquet.read_table(OUT/captions)`` on the compacted copy over the same read of the uncompacted
one (interleaved repeats); the details carry files before/after, the compaction's wall time, and that
both reads give the same rows.
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


def make_output(out: str, clips: int) -> None:
    from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
    from beam_captions.transforms.write import write_clip

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
        write_clip(out, clip_id, elements, asked={"captions": {"model": "m"}})


def read_seconds(out: str) -> float:
    start = time.perf_counter()
    pq.read_table(os.path.join(out, "captions"))
    return time.perf_counter() - start


def count_files(out: str) -> int:
    return sum(name.endswith(".parquet") for _, _, names in os.walk(os.path.join(out, "captions")) for name in names)


def run(clips: int, repeats: int) -> Figure:
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
