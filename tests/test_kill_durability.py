"""A killed batch job keeps the captions of its finished clips, on the DirectRunner and the portable runner (issue 14 §1).

Each test runs the real job (captions and previews, the tiny captioner on vLLM) in processes of its
own, waits for the first finished clip (its metas file, written last), then SIGKILLs every process of
the job: the job's own process group with vLLM's engine-core process; on the portable runner the
worker pool (with its SDK worker and engine), the job service and the submitting process. The rows of
every clip finished by then must be on disk, complete and once each, while other clips had not been
written at all (so they were written as they finished, not at the end of the job). A re-run then skips
the finished clips without touching their files and completes the others: the result is the rows of an
uninterrupted run.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import pyarrow.parquet as pq
import pytest
from clips import make_clip
from conftest import VLLM_KWARGS
from services import kill_groups, log_tail, portable_services, start

from beam_captions.cli import run_job

NUM_CLIPS = 24  # x 4 windows: the job writes clips for a second or more, far longer than a poll (5 ms)
KILL_WAIT_S = 240  # for the first finished clip: the engine starts first


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("kill-clips")
    for i in range(NUM_CLIPS):
        make_clip(str(folder / f"clip {i:02d}.mp4"), 64, 10.0, 96, 64)  # four windows of 16 frames
    return str(folder)


def job_args(clips: str, out: str, captioner: str) -> list[str]:
    # Engine settings as tests/test_runners.py: in-process runs share the session's engine.
    return [
        "--input", clips, "--output", out, "--generate-captions", "--model-dir", captioner, "--generate-previews",
        "--captioning-window-size", "16", "--captioning-remainder-threshold", "8",
        "--captioning-max-output-tokens", "8", "--captioning-batch-size", "4",
        "--preview-target-height", "32", "--preview-target-fps", "4",
        "--vllm-kwargs", json.dumps(VLLM_KWARGS), "--no-gallery",
    ]


def windows_of(rows) -> dict[str, set[tuple[int, int, int]]]:
    """(window_index, start_frame, end_frame) of each clip's rows (or window metas)."""
    found: dict[str, set] = {}
    for row in rows:
        found.setdefault(row["clip_id"], set()).add((row["window_index"], row["start_frame"], row["end_frame"]))
    return found


def caption_rows(out: str) -> list[dict]:
    """Every row under OUT/captions, read as one table (temporaries, named .tmp-*, are not part of it),
    each window once."""
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    keys = [(row["clip_id"], row["window_index"]) for row in rows]
    assert len(keys) == len(set(keys)), "a window has two rows"
    return rows


def metas(out: str) -> dict[str, dict]:
    found = {}
    for path in glob.glob(os.path.join(out, "metas", "*.json")):
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
        found[document["clip_id"]] = document
    return found


def files_of(out: str, clip_ids) -> dict[str, int]:
    """Modification time (ns) of every file of these clips: metas, Parquet rows, previews."""
    paths = []
    for clip_id in clip_ids:
        paths += [os.path.join(out, "metas", f"{clip_id}.json"), os.path.join(out, "captions", f"{clip_id}.parquet")]
        paths += glob.glob(os.path.join(out, "previews", clip_id, "*"))
    return {path: os.stat(path).st_mtime_ns for path in paths}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, clips_dir, captioner_dir) -> dict[str, set]:
    """The windows of each clip in an uninterrupted run (in-process DirectRunner)."""
    out = str(tmp_path_factory.mktemp("reference"))
    counts = run_job(job_args(clips_dir, out, captioner_dir), release_models=False)
    assert counts["clips"] == NUM_CLIPS and not counts.get("clips_failed")
    found = windows_of(caption_rows(out))
    assert len(found) == NUM_CLIPS and all(len(windows) == 4 for windows in found.values())
    return found


def _a_metas_file(out: str) -> bool:
    try:
        return any(e.name.endswith(".json") and not e.name.startswith(".") for e in os.scandir(os.path.join(out, "metas")))
    except FileNotFoundError:
        return False


def kill_when_a_clip_is_done(out: str, procs, logs) -> dict[int, str]:
    """Poll (5 ms) for the first metas file, then SIGKILL the process groups of ``procs``; returns the processes killed."""
    deadline = time.monotonic() + KILL_WAIT_S
    while not _a_metas_file(out):
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, f"{proc.args[:3]} ended before any clip was done:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"no clip done in {KILL_WAIT_S} s:\n{log_tail(logs[-1])}"
        time.sleep(0.005)
    return kill_groups(*procs)


def check_after_kill(out: str, reference: dict[str, set]) -> tuple[dict, dict[str, int]]:
    """The clips finished at the kill, with their rows on disk; the modification times of their files."""
    found = metas(out)
    assert found and all(meta["status"] == "done" for meta in found.values()), {k: m["status"] for k, m in found.items()}
    assert 0 < len(found) < NUM_CLIPS
    rows = caption_rows(out)
    have = windows_of(rows)
    for clip_id, meta in found.items():
        in_metas = windows_of({**window, "clip_id": clip_id} for window in meta["windows"])[clip_id]
        assert have.get(clip_id) == reference[clip_id] == in_metas, clip_id
    assert all(isinstance(r["caption"], str) and r["caption"].strip() for r in rows if r["clip_id"] in found)
    # Clips with nothing on disk yet (not even previews, written after captioning): the finished clips were
    # written while the job still had clips to caption, not at its end. (At most 4 windows, one clip, are
    # in the engine at a time: --captioning-batch-size 4.)
    touched = set(have) | {os.path.basename(p) for p in glob.glob(os.path.join(out, "previews", "*"))}
    untouched = set(reference) - touched
    assert untouched, (f"{len(found)} clips done, but all {NUM_CLIPS} had outputs at the kill: "
                       "the clips were written at the end of the job, not as each finished")
    return found, files_of(out, found)


def check_rerun(out: str, counts: dict, finished: dict, times: dict[str, int], reference: dict[str, set]) -> None:
    assert counts.get("clips_skipped", 0) == len(finished)
    assert counts.get("clips", 0) == NUM_CLIPS - len(finished) and not counts.get("clips_failed")
    assert {k: m["status"] for k, m in metas(out).items()} == dict.fromkeys(reference, "done")
    rows = caption_rows(out)
    assert windows_of(rows) == reference
    assert all(isinstance(r["caption"], str) and r["caption"].strip() for r in rows)
    assert files_of(out, finished) == times, "a finished clip's files were written again"


def test_direct_runner_killed_part_way_keeps_finished_clips_and_a_rerun_completes_the_rest(
    tmp_path, clips_dir, captioner_dir, reference
):
    out, log = str(tmp_path / "out"), tmp_path / "job.log"
    job = start([sys.executable, "-m", "beam_captions", *job_args(clips_dir, out, captioner_dir)], log)
    killed = kill_when_a_clip_is_done(out, [job], [log])
    finished, times = check_after_kill(out, reference)
    print(f"DirectRunner: {len(finished)} of {NUM_CLIPS} clips done when killed: {sorted(killed.values())}")

    counts = run_job(job_args(clips_dir, out, captioner_dir), release_models=False)  # the session's engine
    check_rerun(out, counts, finished, times, reference)


def test_portable_runner_killed_part_way_keeps_finished_clips_and_a_rerun_completes_the_rest(
    tmp_path, clips_dir, captioner_dir, reference
):
    out, submit_log = str(tmp_path / "out"), tmp_path / "submit.log"
    with portable_services(tmp_path / "killed") as services:
        submitter = start([sys.executable, "-m", "beam_captions", *job_args(clips_dir, out, captioner_dir),
                           *services.runner_args()], submit_log)
        # The job service runs the job without its submitter: the job dies only with the services.
        killed = kill_when_a_clip_is_done(out, [services.pool, services.job, submitter],
                                          [services.pool_log, services.job_log, submit_log])
    finished, times = check_after_kill(out, reference)
    print(f"PortableRunner: {len(finished)} of {NUM_CLIPS} clips done when killed: {sorted(killed.values())}")

    # A job run elsewhere holds the output until its lease times out (nothing here can tell it died): --force.
    with portable_services(tmp_path / "rerun") as services:
        counts = run_job(job_args(clips_dir, out, captioner_dir) + services.runner_args() + ["--force"],
                         release_models=False)
    check_rerun(out, counts, finished, times, reference)
