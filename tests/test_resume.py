"""Outputs survive re-runs, crashes and kills: same files, same bytes, no duplicates, nothing missing."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from clips import make_clip

from beam_captions.cli import run_job

NUM_CLIPS = 24


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    for i in range(NUM_CLIPS):
        make_clip(str(folder / f"clip {i:02d} é.mp4"), 40 + i, 10.0, 96, 64)  # spaces and non-ASCII on purpose
    (folder / "broken.mp4").write_bytes(b"\x00" * 100)
    return str(folder)


def job_args(clips: str, out: str) -> list[str]:
    return ["--input", clips, "--output", out, "--generate-previews", "--captioning-window-size", "16",
            "--captioning-remainder-threshold", "8", "--preview-target-height", "32", "--preview-target-fps", "4"]


def snapshot(out: str) -> dict[str, object]:
    """Every output file (but the gallery) by relative path: bytes, or for files that name the
    output root (metas, Parquet) their content with the root replaced, so two roots compare."""
    files: dict[str, object] = {}
    for path in glob.glob(os.path.join(out, "**", "*"), recursive=True):
        if not os.path.isfile(path) or path.endswith(".html"):
            continue
        name = os.path.relpath(path, out)
        if name.startswith("logs"):  # the run's log, not an output
            continue
        if name.startswith("done" + os.sep):  # a marker names its metas' size, which holds the root: compare the rest
            clip_id, size, rest = os.path.basename(name).split(".", 2)
            files[f"done/{clip_id}.SIZE.{rest}"] = size.isdigit()
            continue
        if name.endswith(".parquet"):
            files[name] = [{k: (v.replace(out, "OUT") if isinstance(v, str) else v) for k, v in row.items()}
                           for row in pq.read_table(path).to_pylist()]
        else:
            with open(path, "rb") as handle:
                files[name] = handle.read().replace(out.encode(), b"OUT")
    return files


def captions_file(out: str, metas_path: str) -> str:
    """The clip's own captions file, named like its metas."""
    clip_id = os.path.basename(metas_path)[: -len(".json")]
    return os.path.join(out, "captions", f"{clip_id}.parquet")


def rows(out: str) -> list[tuple]:
    table = pq.read_table(os.path.join(out, "captions"))
    previews = [os.path.relpath(p, out) for p in table["preview"].to_pylist()]
    return sorted(zip(table["clip_id"].to_pylist(), table["window_index"].to_pylist(), previews))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, clips_dir):
    out = str(tmp_path_factory.mktemp("reference"))
    counts = run_job(job_args(clips_dir, out))
    assert counts["clips_found"] == NUM_CLIPS + 1 and counts["failures_prepare"] == 1
    return out


def test_a_rerun_without_skipping_rewrites_the_same_bytes(tmp_path, clips_dir, reference):
    out = str(tmp_path / "out")
    run_job(job_args(clips_dir, out))
    first = snapshot(out)
    run_job(job_args(clips_dir, out) + ["--no-skip-existing"])
    assert snapshot(out) == first
    assert set(first) == set(snapshot(reference))
    assert len(rows(out)) == len(set(rows(out)))


def test_a_rerun_skips_finished_clips_and_touches_nothing(tmp_path, clips_dir):
    out = str(tmp_path / "out")
    run_job(job_args(clips_dir, out))
    times = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "*", "**"), recursive=True)
             if os.path.relpath(p, out).split(os.sep)[0] != "logs"}  # each run adds its own log file
    counts = run_job(job_args(clips_dir, out) + ["--no-retry-failed"])  # the broken file failed: kept as is
    assert counts["clips_skipped"] == NUM_CLIPS + 1 and counts.get("clips", 0) == 0
    assert {p: os.stat(p).st_mtime_ns for p in times} == times


def test_a_crash_between_files_is_completed_by_the_next_run(tmp_path, clips_dir, reference):
    out = str(tmp_path / "out")
    run_job(job_args(clips_dir, out))
    metas = sorted(glob.glob(os.path.join(out, "metas", "*.json")))
    # Clip ids follow the paths, so where the broken clip's metas (it has no rows) sorts changes from run
    # to run: the crashes below are staged on clips that finished, and the failed one is kept as it is.
    finished = [p for p in metas if os.path.exists(captions_file(out, p))]
    assert len(finished) == NUM_CLIPS
    for path in finished[::3]:  # as if killed after the rows and previews but before the metas marker
        os.unlink(path)
    os.unlink(finished[1])  # and one killed before its rows
    os.unlink(captions_file(out, finished[1]))
    open(os.path.join(out, "metas", ".tmp-leftover.json"), "w").write("{")  # a half-written temporary
    counts = run_job(job_args(clips_dir, out) + ["--no-retry-failed"])
    assert counts["clips"] == len(finished[::3]) + 1 and counts["clips_skipped"] == len(metas) - counts["clips"]
    after = {k: v for k, v in snapshot(out).items() if ".tmp-" not in k}
    assert after == snapshot(reference)


def test_sigkill_part_way_then_rerun_matches_an_uninterrupted_run(tmp_path, clips_dir, reference):
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "beam_captions", *job_args(clips_dir, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(out, "metas", "*.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "the job wrote nothing in two minutes"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written_before_kill = len(glob.glob(os.path.join(out, "metas", "*.json")))
    print(f"killed after {written_before_kill} of {NUM_CLIPS + 1} clips were finished")
    counts = run_job(job_args(clips_dir, out) + ["--no-retry-failed"])
    assert counts.get("clips_skipped", 0) == written_before_kill
    assert {k: v for k, v in snapshot(out).items() if ".tmp-" not in k} == snapshot(reference)
    assert rows(out) == rows(reference) and len(rows(out)) == len(set(rows(out)))
