"""Issue 29, part 4 and part 7 (Delta): the committer of a ``--captions-table delta`` output.

A retried commit adds nothing (Delta transaction identifiers); two first writes of one clip, a redo after a
lost or unreadable metas, and a batch cut differently on a retry leave each window once (the committer's
index of the table); a replace reads only the data files that hold the replaced clips (``write_seq``); a
batch run commits as it goes and a streaming run works on the local runner (the launcher commits); a
stopped run says how many clips it left staged and the next run says that it committed them."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clips import make_clip
from test_delta_output import delta_args, history, metas, polars_rows, stage_synthetic_clip, windows_of_metas
from test_delta_output import windows_of_rows

import beam_captions.io.delta_committer as delta_committer
import beam_captions.transforms.write as write_module
from beam_captions.cli import run_job
from beam_captions.io.delta import read_staged, staged_files
from beam_captions.io.delta_committer import CommitLoop, Committer, commit_clips, commit_leftovers
from beam_captions.io.delta_index import TableIndex


def writes(out: str) -> list[dict]:
    """The table's commits that changed rows."""
    return [h for h in history(out) if h["operation"] == "WRITE"]


def captions_of(out: str) -> dict[tuple[str, int], str]:
    return {(r["clip_id"], r["window_index"]): r["caption"] for r in polars_rows(out)}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    clips = tmp_path_factory.mktemp("delta-commit-clips")
    for number in range(4):
        make_clip(str(clips / f"c{number}.mp4"), 24 + 8 * number, 10.0, 96, 64)
    return clips


def test_an_attempt_whose_commit_landed_is_not_made_again(tmp_path, monkeypatch):
    """The commit goes through but its answer is lost (a conflict error after it landed): the retry finds
    the committer's transaction identifier in the table and commits nothing."""
    import deltalake
    from deltalake.exceptions import CommitFailedError

    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(4)]
    write = deltalake.write_deltalake
    calls = []

    def lands_then_fails(*args, **kwargs):
        calls.append(kwargs["mode"])
        write(*args, **kwargs)
        if len(calls) == 1:
            raise CommitFailedError("the answer of a commit that went through was lost")

    monkeypatch.setattr(deltalake, "write_deltalake", lands_then_fails)
    done = commit_clips(out, ids)
    assert calls == ["append"] and done["delta_commits"] == 1 and done["delta_clips_committed"] == 4
    assert len(writes(out)) == 1 and len(polars_rows(out)) == 12 and staged_files(out) == []


def test_two_first_writes_of_one_clip_leave_each_window_once(tmp_path):
    """A retried bundle races its first attempt: neither write saw the other's metas, both say "first". The
    first is committed, then the second: the committer finds the clip in the table and replaces its rows."""
    out = str(tmp_path / "out")
    committer = Committer(out)
    clip_id = stage_synthetic_clip(out, 1, windows=3, tag="first")
    others = [stage_synthetic_clip(out, number) for number in (2, 3)]
    committer.commit([clip_id, *others])
    os.remove(os.path.join(out, "metas", f"{clip_id}.json"))  # the second write read no metas
    stage_synthetic_clip(out, 1, windows=2, tag="second")
    assert committer.commit([clip_id])["delta_commits_replacing"] == 1
    assert sorted(v for (c, _), v in captions_of(out).items() if c == clip_id) == ["second 1/0", "second 1/1"]
    stage_synthetic_clip(out, 3, windows=1, tag="third")  # and a committer of its own (the next run) does the same
    commit_clips(out, [others[1]])
    assert windows_of_rows(polars_rows(out)) == windows_of_metas(out)


def test_a_committer_sees_the_clips_another_committer_committed(tmp_path):
    """A commit by someone else (``beam-captions compact`` committing leftovers, another job) since the
    committer read its index: it reads it again before it commits."""
    out = str(tmp_path / "out")
    committer = Committer(out)
    committer.commit([stage_synthetic_clip(out, 1)])  # the committer has read the table
    clip_id = stage_synthetic_clip(out, 2)
    commit_clips(out, [clip_id])  # another committer commits clip 2
    stage_synthetic_clip(out, 2, windows=1, tag="again")
    assert committer.commit([clip_id])["delta_commits_replacing"] == 1
    assert [v for (c, _), v in captions_of(out).items() if c == clip_id] == ["again 2/0"]


def test_a_redo_with_no_window_after_a_lost_metas_removes_the_clips_rows(tmp_path):
    from beam_captions.io.clip_output import write_clip
    from beam_captions.records import Failure

    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(2)]
    commit_clips(out, ids)
    source = metas(out)[ids[0]]["source"]
    os.remove(os.path.join(out, "metas", f"{ids[0]}.json"))
    broken = Failure(source, ids[0], "prepare", "ValueError", "not a video any more", windows_before=0,
                     source_version=(9999, 2.0))
    assert write_clip(out, ids[0], [broken], captions_table="delta")
    commit_clips(out, ids[:1])
    assert {r["clip_id"] for r in polars_rows(out)} == {ids[1]}


def test_a_redo_after_a_lost_and_an_unreadable_metas_gives_each_window_once(clip_folder, tmp_path):
    clips, out = tmp_path / "clips", str(tmp_path / "out")
    shutil.copytree(clip_folder, clips)
    run_job(delta_args(str(clips), out), release_models=False)
    before = polars_rows(out)
    lost, unreadable = sorted(metas(out))[:2]
    os.remove(os.path.join(out, "metas", f"{lost}.json"))
    with open(os.path.join(out, "metas", f"{unreadable}.json"), "r+b") as handle:
        handle.truncate(20)  # a partial copy
    counts = run_job(delta_args(str(clips), out), release_models=False)
    assert counts["clips_skipped"] == 2 and counts["delta_clips_committed"] == 2
    rows = polars_rows(out)  # each window once
    assert windows_of_rows(rows) == windows_of_metas(out) and len(rows) == len(before)


def test_a_replace_reads_only_the_data_files_that_hold_the_clips(tmp_path):
    """Every data file but the one holding the redone clips is made unreadable: the replace never opens them."""
    out = str(tmp_path / "out")
    committer = Committer(out)
    batches = [[stage_synthetic_clip(out, 10 * b + n) for n in range(3)] for b in range(4)]
    for batch in batches:
        committer.commit(batch)
    for path in glob.glob(os.path.join(out, "captions", "*.parquet")):
        if not set(pq.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist()) & set(batches[1]):
            open(path, "wb").write(b"no longer a Parquet file")
    for number in (10, 11):
        stage_synthetic_clip(out, number, windows=1, tag="redo")
    done = committer.commit(batches[1][:2])
    assert done["delta_commits_replacing"] == 1
    removed = history(out)[-1]["operationMetrics"]["num_removed_files"]
    assert removed == 1, "only the file that held the clips is rewritten"


def test_a_table_an_older_release_made_gets_write_seq_and_its_rows_are_replaced(tmp_path):
    from deltalake import write_deltalake

    out = str(tmp_path / "out")
    clip_id = stage_synthetic_clip(out, 1, windows=3)
    staged = metas(out)[clip_id]["captions_staged"]
    old = read_staged(out, staged)
    write_deltalake(os.path.join(out, "captions"), old)  # as the previous release committed it: no write_seq
    stage_synthetic_clip(out, 1, windows=2, tag="redo")
    assert commit_clips(out, [clip_id])["delta_commits_replacing"] == 1
    assert [r["caption"] for r in polars_rows(out)] == ["redo 1/0", "redo 1/1"]


def test_a_clip_an_older_release_staged_as_parquet_is_committed(tmp_path):
    import json

    out = str(tmp_path / "out")
    clip_id = stage_synthetic_clip(out, 1, windows=2)
    meta_path = os.path.join(out, "metas", f"{clip_id}.json")
    meta = json.load(open(meta_path))
    staged = meta["captions_staged"]
    pq.write_table(read_staged(out, staged), os.path.join(out, staged[: -len(".arrow")] + ".parquet"))
    os.remove(os.path.join(out, staged))
    meta["captions_staged"] = staged[: -len(".arrow")] + ".parquet"
    json.dump(meta, open(meta_path, "w"))
    assert commit_leftovers(out)["delta_clips_committed"] == 1
    assert len(polars_rows(out)) == 2 and staged_files(out) == []


def test_the_index_keeps_what_commits_changed_after_it_folds_them(monkeypatch):
    monkeypatch.setattr("beam_captions.io.delta_index._FOLD_AT", 2)
    index = TableIndex(pa.array([], pa.uint64()).to_numpy(), pa.array([], pa.int64()).to_numpy())
    index.record(["a", "b"], 5, with_rows=["a"])  # folds: a has rows of 5, b none
    index.record(["c"], 6, with_rows=["c"])
    index.record(["a", "c"], 7, with_rows=["c"])  # folds again: a's rows are gone
    assert (index.seqs_of("a"), index.seqs_of("b"), index.seqs_of("c")) == (frozenset(), frozenset(), {7})
    assert len(index) == 1


def test_a_failed_pass_is_tried_again_by_the_next(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    loop = CommitLoop(out, every_s=0.05)
    loop.start()
    real, failures = Committer.commit_staged, []

    def fails_once(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError("the store did not answer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Committer, "commit_staged", fails_once)
    ids = [stage_synthetic_clip(out, number) for number in range(2)]
    deadline = time.monotonic() + 20
    while staged_files(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    loop.close()
    assert failures and staged_files(out) == [] and {r["clip_id"] for r in polars_rows(out)} == set(ids)


def test_a_batch_run_commits_as_it_goes(clip_folder, tmp_path, monkeypatch):
    """Each clip the run writes is in the table before the run writes the next, and every reader sees each
    window once at every moment."""
    out = str(tmp_path / "out")
    monkeypatch.setattr(delta_committer, "COMMIT_EVERY_S", 0.05)
    real, seen = write_module.write_clip, []

    def write_then_wait_for_its_commit(output, clip_id, *args, **kwargs):
        written = real(output, clip_id, *args, **kwargs)
        deadline = time.monotonic() + 10
        while staged_files(output) and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append({r["clip_id"] for r in polars_rows(output)})  # asserts each window once
        return written

    monkeypatch.setattr(write_module, "write_clip", write_then_wait_for_its_commit)
    reads = []
    read = TableIndex.read.__func__
    monkeypatch.setattr(TableIndex, "read", classmethod(lambda cls, table: reads.append(1) or read(cls, table)))
    counts = run_job([*delta_args(str(clip_folder), out), "--local-workers", "1"], release_models=False)
    assert counts["delta_clips_committed"] == 4 and len(writes(out)) == 4
    assert [len(ids) for ids in seen] == [1, 2, 3, 4], "each clip was committed before the next was written"
    assert len(reads) == 1, "the committer reads the table's index once, then keeps it with its own commits"


def test_a_stopped_run_says_how_many_clips_it_left_staged_and_the_next_run_commits_them(clip_folder, tmp_path,
                                                                                         monkeypatch, capfd):
    out = str(tmp_path / "out")
    monkeypatch.setattr(delta_committer, "COMMIT_EVERY_S", 3600.0)  # no pass while the run runs
    real, written = write_module.write_clip, []

    def write_then_stop(*args, **kwargs):
        written.append(real(*args, **kwargs))
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once two clips are written
        return written[-1]

    monkeypatch.setattr(write_module, "write_clip", write_then_stop)
    stderr = sys.stderr
    with pytest.raises(SystemExit) as stopped:
        run_job([*delta_args(str(clip_folder), out), "--local-workers", "1"], release_models=False)
    assert stopped.value.code == 130
    sys.stderr = stderr  # a stopped run silences it (its process ends next); the next run is in this process
    staged = len(metas(out))
    assert staged >= 2 and len(staged_files(out)) == staged
    told = capfd.readouterr()
    assert (f"  delta staged     {staged} clips staged and not committed: the next run commits them (or "
            "`beam-captions compact`)") in told.out
    monkeypatch.setattr(write_module, "write_clip", real)
    counts = run_job(delta_args(str(clip_folder), out), release_models=False)
    assert f"beam-captions: committed {staged} clips an earlier run left staged in {out}" in capfd.readouterr().err
    assert counts["clips_skipped"] == staged and windows_of_rows(polars_rows(out)) == windows_of_metas(out)


def test_a_streaming_run_commits_to_a_delta_table_on_the_local_runner(clip_folder, tmp_path):
    watched, out = tmp_path / "watched", str(tmp_path / "out")
    shutil.copytree(clip_folder, watched)
    command = [sys.executable, "-m", "beam_captions", "--streaming", *delta_args(str(watched), out),
               "--watch-interval-seconds", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (len(metas(out)) == 4 and os.path.isdir(os.path.join(out, "captions", "_delta_log"))
                   and not staged_files(out)):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the clips were not committed within two minutes"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 143 and "beam-captions stopped after" in output, output[-3000:]
    assert windows_of_rows(polars_rows(out)) == windows_of_metas(out)
