"""``beam-captions compact OUT`` stops cleanly (issue 23, point 4): Ctrl-C / SIGTERM end it with one line and
exit 130 / 143, the merged files being committed are finished first (each row stays once), a second run
completes it; a bad --target-size-mb is one line and exit 2 before any work."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_compact import assert_each_clip_in_its_file, table_rows, write_synthetic_clip
from test_stop import run_with_the_main_thread_waiting

from beam_captions.cli import compact
from beam_captions.io import compaction
from beam_captions.io.compaction import MANIFEST, list_caption_files, merge_group, plan_groups

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIPS = 1000
TARGET = ["--target-size-mb", "0.02", "--local-workers", "2"]  # about nine merged files of ~110 small ones each

# The real command, each commit slowed down (its metas re-pointing, after the merged file's rename) so that
# a signal lands while one is under way.
SLOW_COMMITS = """
import sys, time
from beam_captions.io import compaction
repoint = compaction._repoint
def slow(*args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return repoint(*args, **kwargs)
compaction._repoint = slow
from beam_captions.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("small"))
    for number in range(NUM_CLIPS):
        write_synthetic_clip(out, number)
    return out


@pytest.fixture
def out(small_files, tmp_path) -> str:
    copy = str(tmp_path / "out")
    shutil.copytree(small_files, copy)
    return copy


def start(out: str, *extra: str, slow_commits_s: float = 0.0) -> subprocess.Popen:
    if slow_commits_s:
        command = [sys.executable, "-c", SLOW_COMMITS, str(slow_commits_s)]
    else:
        command = [sys.executable, "-m", "beam_captions"]
    return subprocess.Popen([*command, "compact", out, *TARGET, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def merged_files(out: str) -> list[str]:
    return glob.glob(os.path.join(out, "captions", "part-*.parquet"))


def small_files_left(out: str) -> list[str]:
    return [f for f in glob.glob(os.path.join(out, "captions", "*.parquet"))
            if not os.path.basename(f).startswith("part-")]


def journals(out: str) -> list[str]:
    return glob.glob(os.path.join(out, "_compact", "*"))


def wait_for(condition, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"compact ended first: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def handlers_installed(process: subprocess.Popen) -> bool:
    """Whether the process catches SIGTERM (Linux: /proc/PID/status), i.e. compact's stop handler is in place."""
    with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def stop(process: subprocess.Popen, signum: int, code: int) -> str:
    """Send ``signum``; the process ends within seconds with ``code``, no traceback and one line on stderr
    saying to run compact again, which it returns."""
    process.send_signal(signum)
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-3000:]
    assert time.monotonic() - started < 20
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert "beam-captions compact" in lines[0] and "again completes the rest" in lines[0], lines[0]
    assert "finished" not in stdout
    return lines[0]


def committed(line: str) -> int:
    found = re.search(r"stopped after committing (\d+)", line)
    assert found, line
    return int(found.group(1))


def assert_completed_by_a_second_run(out: str, before: list) -> None:
    second = subprocess.run([sys.executable, "-m", "beam_captions", "compact", out, *TARGET], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert table_rows(out) == before  # each window exactly once
    assert len(pq.read_table(os.path.join(out, "captions"))) == 3 * NUM_CLIPS
    assert not small_files_left(out) and not journals(out)
    manifest = json.load(open(os.path.join(out, "captions", MANIFEST)))
    assert manifest["rows"] == 3 * NUM_CLIPS and manifest["clips"] == NUM_CLIPS
    assert sorted(f["path"] for f in manifest["files"]) == [f.relpath for f in list_caption_files(out)]
    assert sum(f["rows"] for f in manifest["files"]) == 3 * NUM_CLIPS


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_after_a_merged_file_is_committed_says_so_and_a_second_run_completes_it(out, signum, code):
    before = table_rows(out)
    process = start(out)
    wait_for(lambda: merged_files(out), process)
    line = stop(process, signum, code)
    assert f"compact {out}" in line
    assert small_files_left(out), "the compaction ended before it could be stopped"
    # the commits under way were finished: the table has every row once even before the second run
    assert not journals(out) and table_rows(out) == before
    assert committed(line) == len(merged_files(out)) >= 1
    assert_completed_by_a_second_run(out, before)


@pytest.mark.parametrize("workers", ["2", "1"])  # threads of the DirectRunner; 1: the merges run in the main thread
def test_a_stop_during_a_commit_waits_for_it(out, workers):
    before = table_rows(out)
    process = start(out, "--local-workers", workers, slow_commits_s=1.5)
    wait_for(lambda: merged_files(out), process)  # renamed into place: its metas are being re-pointed now
    assert journals(out)
    line = stop(process, signal.SIGINT, 130)
    assert not journals(out), "a commit was left part way"
    assert table_rows(out) == before
    assert committed(line) == len(merged_files(out)) >= 1 and small_files_left(out)
    assert_completed_by_a_second_run(out, before)


def test_a_second_signal_stops_at_once_and_the_next_run_finishes_the_commit_it_cut(out):
    before = table_rows(out)
    process = start(out, slow_commits_s=3.0)
    wait_for(lambda: merged_files(out), process)  # renamed, small files removed, metas being re-pointed
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    line = stop(process, signal.SIGINT, 130)
    assert "stopped at once" in line
    assert journals(out), "the commit under way was cut"
    assert table_rows(out) == before  # its small files went right after the rename: no window twice
    assert_completed_by_a_second_run(out, before)
    assert_each_clip_in_its_file(out)


def test_a_signal_another_thread_receives_stops_a_compaction_whose_main_thread_waits():
    """The DirectRunner's main thread waits on a stage's futures; a signal the kernel hands to a worker
    thread must stop the merges then, not when the stage is done (CI saw all nine merged files committed
    after a Ctrl-C)."""
    done, took = run_with_the_main_thread_waiting("StopCompaction", "'OUT'")
    assert done.returncode == 143 and took < 20, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["READY"]
    assert done.stderr.strip().splitlines() == [
        "beam-captions compact: stopped after committing 0 merged files; running `beam-captions compact OUT` "
        "again completes the rest"]


def test_a_stop_before_any_merge(out):
    before = table_rows(out)
    process = start(out)
    wait_for(lambda: handlers_installed(process), process)
    line = stop(process, signal.SIGINT, 130)
    assert "before any merge" in line or committed(line) == 0, line
    assert not merged_files(out) and len(small_files_left(out)) == NUM_CLIPS
    assert table_rows(out) == before
    assert_completed_by_a_second_run(out, before)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "-0.5", "1e-9", "1e400", "abc", ""])
def test_a_bad_target_size_is_one_line_and_exit_2_before_any_work(out, value):
    files = sorted(os.listdir(os.path.join(out, "captions")))
    done = subprocess.run([sys.executable, "-m", "beam_captions", "compact", out, f"--target-size-mb={value}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--target-size-mb" in done.stderr and repr(value) in done.stderr, done.stderr
    assert not os.path.exists(os.path.join(out, "_compact"))
    assert sorted(os.listdir(os.path.join(out, "captions"))) == files


def test_a_negative_target_size_as_a_separate_argument_is_one_line_too(out):
    for value in ("-1", "-inf"):
        done = subprocess.run([sys.executable, "-m", "beam_captions", "compact", out, "--target-size-mb", value],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--target-size-mb" in done.stderr, done.stderr


def test_the_small_files_go_right_after_the_rename_and_a_kill_while_metas_are_re_pointed_is_finished(tmp_path,
                                                                                                    monkeypatch):
    """Between the merged file's rename and its members' removal nothing slow happens (a reader of the folder
    sees rows twice only there): the metas are re-pointed after. A kill half way through that is finished by
    the next compaction."""
    out = str(tmp_path / "out")
    for number in range(8):
        write_synthetic_clip(out, number)
    before = table_rows(out)
    [group] = plan_groups(list_caption_files(out), 2**30)
    repoint = compaction._repoint

    def half_then_killed(output, merged, clips):
        assert [f.relpath for f in list_caption_files(out)] == [merged], "members still there while re-pointing"
        assert table_rows(out) == before
        repoint(output, merged, dict(sorted(clips.items())[:4]))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(compaction, "_repoint", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        merge_group(out, group)
    monkeypatch.setattr(compaction, "_repoint", repoint)
    assert journals(out)
    counts = compact([out])
    assert counts["compactions_finished"] == 1 and not journals(out)
    assert table_rows(out) == before and len(list_caption_files(out)) == 1
    assert_each_clip_in_its_file(out)


@pytest.fixture
def stopping():
    """A stop asked for in this process (as Ctrl-C asks ``compact``); forgotten afterwards."""
    compaction.reset_progress()
    yield compaction.request_stop
    compaction.reset_progress()


def test_after_a_stop_no_merge_or_commit_starts(tmp_path, stopping):
    out = str(tmp_path / "out")
    for number in range(8):
        write_synthetic_clip(out, number)
    [group] = plan_groups(list_caption_files(out), 2**30)
    before = sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True))

    # stopped while the group was read and written: the staged file goes, nothing is committed
    assert merge_group(out, group, fail_after=lambda step: step == "staged" and stopping()) == {"groups_stopped": 1}
    assert sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)) == before
    assert not glob.glob(os.path.join(out, "captions", ".*")) and compaction.progress()["committed"] == 0
    # stopped before it began: nothing read or written
    steps = []
    assert merge_group(out, group, fail_after=steps.append) == {"groups_stopped": 1} and steps == []
    assert compaction.wait_for_commits(0.1)


def test_after_a_stop_journals_are_left_for_the_next_compaction(tmp_path, stopping):
    out = str(tmp_path / "out")
    for number in range(8):
        write_synthetic_clip(out, number)
    before = table_rows(out)
    [group] = plan_groups(list_caption_files(out), 2**30)

    def kill(step: str) -> None:
        if step == "journal":
            raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        merge_group(out, group, fail_after=kill)
    stopping()
    assert compaction.finish_journals(out) == 0 and compaction.remove_stray_files(out) == 0
    assert journals(out) and glob.glob(os.path.join(out, "captions", "_tmp-part-*"))
    compaction.reset_progress()
    assert compact([out])["compactions_finished"] == 1
    assert table_rows(out) == before and not journals(out)


# The real command; a Ctrl-C comes once the compaction has ended, while its summary is being written.
SIGNAL_AT_THE_SUMMARY = """
import os, signal, sys, time
from beam_captions import metrics
real = metrics.counters
def counters(result):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(2)  # the signal's watcher thread acts meanwhile
    return real(result)
metrics.counters = counters
from beam_captions.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_after_the_compaction_ended_lets_its_summary_come_and_exit_0(tmp_path):
    """As with a run: the work is done, so the summary says ``finished`` and the exit status is 0 (never a
    full summary and 130, nor a stop line)."""
    out = str(tmp_path / "out")
    for number in range(4):
        write_synthetic_clip(out, number)
    before = table_rows(out)
    done = subprocess.run([sys.executable, "-c", SIGNAL_AT_THE_SUMMARY, "compact", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"beam-captions compact finished in \d+\.\d s", done.stdout.splitlines()[0]), done.stdout
    assert "  files            4 before, 1 after (4 merged into 1)" in done.stdout.splitlines()
    assert "stopped" not in done.stdout + done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert table_rows(out) == before and len(list_caption_files(out)) == 1
