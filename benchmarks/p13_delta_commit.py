"""P13: what writing a captions table costs per 1,000 clips, Delta Lake output against plain Parquet.

``clips`` synthetic clips (1 to 4 windows each, ~60-word captions: P9's) go through the real writer
(``write_clip``) into a fresh output, as a caption job writes them:

- ours, ``--captions-table delta``: ``write_clip`` stages each clip's rows (a Parquet file outside the
  table) and writes its metas; then the committer's work (``io.delta_committer.commit_clips``, what the
  ``CommitToDelta`` step runs) in batches of ``io.delta_committer.BATCH_CLIPS``: read the batch's metas and staged
  files, one Delta transaction, delete the staged files;
- baseline, the plain Parquet output: ``write_clip`` writes each clip's file and its metas (nothing to
  commit).

The figure is seconds per 1,000 clips of each (interleaved repeats, medians); the details split ours
into staging and committing, give the commits and data files made, and time one batch of redone clips
(a commit that replaces rows: it reads the table's files that hold them).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from common import Figure, interleaved, median_ratio
from p9_compact import make_output


def _clip_ids(out: str) -> list[str]:
    return sorted(name[: -len(".json")] for name in os.listdir(os.path.join(out, "metas")))


def commit_in_batches(out: str) -> int:
    """The committer's work on every clip of ``out``, a batch at a time; returns the commits made."""
    from beam_captions.io.delta_committer import BATCH_CLIPS, commit_clips

    ids = _clip_ids(out)
    commits = 0
    for start in range(0, len(ids), BATCH_CLIPS):
        commits += commit_clips(out, ids[start:start + BATCH_CLIPS]).get("delta_commits", 0)
    return commits


def run(clips: int, repeats: int) -> Figure:
    from beam_captions.io.delta_committer import BATCH_CLIPS, commit_clips

    figure = Figure("P13", f"write {clips} clips' rows: Delta (stage + commit) / plain Parquet",
                    "s per 1,000 clips", ("<=", 2.0))
    root = tempfile.mkdtemp(prefix="p13-")
    split: list[tuple[float, float]] = []
    made: dict = {}

    def delta() -> float:
        out = os.path.join(root, "delta")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        make_output(out, clips, "delta")
        staged = time.perf_counter()
        made["commits"] = commit_in_batches(out)
        done = time.perf_counter()
        split.append((staged - start, done - staged))
        return (done - start) * 1000 / clips

    def parquet() -> float:
        out = os.path.join(root, "parquet")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        make_output(out, clips, "parquet")
        return (time.perf_counter() - start) * 1000 / clips

    try:
        ours, baseline = interleaved(repeats, delta, parquet)
        out = os.path.join(root, "delta")
        from deltalake import DeltaTable

        table = DeltaTable(os.path.join(out, "captions"))
        rows = table.to_pyarrow_table(columns=["clip_id", "window_index"])
        keys = set(zip(rows.column("clip_id").to_pylist(), rows.column("window_index").to_pylist()))
        make_output(out, BATCH_CLIPS, "delta")  # the first clips written again: a batch of redone clips
        start = time.perf_counter()
        redo = commit_clips(out, _redone(out))
        redo_s = time.perf_counter() - start
        figure.ours, figure.baseline = statistics.median(ours), statistics.median(baseline)
        figure.ratio = median_ratio(ours, baseline)
        figure.details = {
            "clips": clips, "repeats": repeats, "batch_clips": BATCH_CLIPS,
            "delta_s_per_1000": ours, "parquet_s_per_1000": baseline,
            "delta_stage_s": [round(s, 3) for s, _ in split], "delta_commit_s": [round(c, 3) for _, c in split],
            "commits": made.get("commits"), "data_files": len(table.file_uris()), "rows": rows.num_rows,
            "each_window_once": len(keys) == rows.num_rows,
            "redo_batch_commit_s": round(redo_s, 3), "redo_batch_replaced": bool(redo.get("delta_commits_replacing")),
        }
        if len(keys) != rows.num_rows:
            figure.skipped = "error: a window is in the Delta table twice"
        return figure
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _redone(out: str) -> list[str]:
    """The clips whose metas names a staged file that is still there (the redo batch)."""
    import json

    found = []
    for clip_id in _clip_ids(out):
        with open(os.path.join(out, "metas", f"{clip_id}.json"), encoding="utf-8") as handle:
            staged = json.load(handle).get("captions_staged")
        if staged and os.path.exists(os.path.join(out, staged)):
            found.append(clip_id)
    return found
