"""``--captions-table delta`` (issue 21, point 4): OUT/captions as a Delta Lake table, read back by an outside
reader (Polars), with a redo, a compaction, the recovery of staged rows a dead job left, and commit races.

The pipeline runs here are previews-only (no model is loaded)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import threading

import polars as pl
import pytest
from clips import make_clip
from test_compact import previews_args

from beam_captions.cli import compact, run_job
from beam_captions.io import delta
from beam_captions.io.delta import staged_files
from beam_captions.io.delta_committer import commit_clips, commit_leftovers
from beam_captions.io.read_captions import read_captions
from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
from beam_captions.io.clip_output import write_clip


def delta_args(clips: str, out: str) -> list[str]:
    return [*previews_args(clips, out), "--captions-table", "delta", "--no-gallery"]


def polars_rows(out: str) -> list[dict]:
    """The table as Polars reads it (``pl.read_delta``), sorted, without ``write_seq`` (which every row has);
    asserts each (clip_id, window_index) once."""
    table = pl.read_delta(os.path.join(out, "captions")).sort(["clip_id", "window_index"])
    assert table["write_seq"].null_count() == 0
    rows = table.drop("write_seq").to_dicts()
    keys = [(r["clip_id"], r["window_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a window is in the table twice"
    return rows


def metas(out: str) -> dict[str, dict]:
    return {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json"))}


def windows_of_metas(out: str) -> list[tuple]:
    return sorted((clip_id, w["window_index"], w["start_frame"], w["end_frame"], w["preview"])
                  for clip_id, meta in metas(out).items() for w in meta["windows"])


def windows_of_rows(rows: list[dict]) -> list[tuple]:
    return sorted((r["clip_id"], r["window_index"], r["start_frame"], r["end_frame"], r["preview"]) for r in rows)


def data_files(out: str) -> list[str]:
    """Parquet files under OUT/captions (the table's data files, live or not yet vacuumed)."""
    return glob.glob(os.path.join(out, "captions", "*.parquet"))


def history(out: str) -> list[dict]:
    from deltalake import DeltaTable

    return sorted(DeltaTable(os.path.join(out, "captions")).history(), key=lambda h: h["version"])


def stage_synthetic_clip(out: str, number: int, windows: int = 3, tag: str = "first") -> str:
    """One clip through the real writer in delta mode (staged rows, metas), with no committer after it:
    what a job killed before its commit leaves."""
    source = f"/videos/staged-{number:04d}.mp4"
    clip_id = clip_id_for(source)
    version = (2000 + number, 1.0)
    elements = [WindowRecord(clip_id, source, i, i * 16, i * 16 + 15, i * 1.6, i * 1.6 + 1.6, (i * 16,),
                             caption=f"{tag} {number}/{i}", source_version=version) for i in range(windows)]
    elements.append(ClipInfo(clip_id, source, 96, 64, 10.0, windows * 16, "h264", windows * 1.6, windows,
                             source_version=version))
    assert write_clip(out, clip_id, elements, asked={"captions": {"model": "m"}}, captions_table="delta")
    return clip_id


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    clips = tmp_path_factory.mktemp("delta-clips")
    for number in range(4):
        make_clip(str(clips / f"c{number}.mp4"), 24 + 8 * number, 10.0, 96, 64)
    return clips


@pytest.fixture(scope="module")
def first_run(clip_folder, tmp_path_factory) -> str:
    """A previews-only run with --captions-table delta, kept as it left the output."""
    out = str(tmp_path_factory.mktemp("delta-run") / "out")
    counts = run_job([*previews_args(str(clip_folder), out), "--captions-table", "delta"], release_models=False)
    assert counts["clips"] == 4 and counts.get("delta_clips_committed") == 4
    return out


def test_a_run_makes_a_delta_table_polars_reads_with_every_window_once(first_run):
    out = first_run
    rows = polars_rows(out)
    assert windows_of_rows(rows) == windows_of_metas(out) and len(rows) == 2 + 2 + 3 + 3
    assert {r["source"] for r in rows} == {m["source"] for m in metas(out).values()}
    assert all(m["captions_table"] == "delta" and m["captions_file"] is None for m in metas(out).values())
    assert staged_files(out) == [], "every staged file is committed and deleted"
    commits = [h for h in history(out) if h["operation"] != "CREATE TABLE"]
    assert commits and all(c["operationParameters"]["mode"] == "Append" for c in commits)  # new clips: no table scan
    through_api = read_captions(out).sort_by([("clip_id", "ascending"), ("window_index", "ascending")]).to_pylist()
    assert through_api == rows
    assert not glob.glob(os.path.join(out, "captions", "*", "*.parquet")), "a Delta output has no partitions"
    gallery = open(os.path.join(out, "index.html"), encoding="utf-8").read()  # the gallery reads the metas
    assert all(f"c{number}.mp4" in gallery for number in range(4))


def test_a_rerun_skips_every_done_clip_and_commits_nothing(first_run, clip_folder, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(first_run, out)
    versions = len(history(out))
    counts = run_job(delta_args(str(clip_folder), out), release_models=False)
    assert counts["clips_skipped"] == 4 and counts.get("delta_commits", 0) == 0 and len(history(out)) == versions


def own_run(clip_folder, tmp_path) -> tuple:
    """A first run of its own (a redo changes the clips; clip ids depend on where the clips are)."""
    clips, out = tmp_path / "clips", str(tmp_path / "out")
    shutil.copytree(clip_folder, clips)
    run_job(delta_args(str(clips), out), release_models=False)
    return clips, out


def test_a_redo_replaces_the_clips_rows_in_one_transaction(clip_folder, tmp_path):
    clips, out = own_run(clip_folder, tmp_path)
    before = polars_rows(out)
    replaced = str(clips / "c3.mp4")  # 48 frames: 3 windows
    redone = clip_id_for(replaced)
    assert [r["window_index"] for r in before if r["clip_id"] == redone] == [0, 1, 2]
    make_clip(replaced, 26, 10.0, 96, 64)  # another file under the same name: two windows
    last_version = history(out)[-1]["version"]
    counts = run_job(delta_args(str(clips), out), release_models=False)
    assert counts["clips_replaced"] == 1 and counts["clips_skipped"] == 3
    new = [h for h in history(out) if h["version"] > last_version]
    assert len(new) == 1, "the redo is one commit"
    assert new[0]["operationParameters"]["mode"] == "Overwrite" and redone in new[0]["operationParameters"]["predicate"]
    rows = polars_rows(out)
    mine = [(r["window_index"], r["end_frame"]) for r in rows if r["clip_id"] == redone]
    assert mine == [(0, 15), (1, 25)], "no window of the old file survives"
    assert [r for r in rows if r["clip_id"] != redone] == [r for r in before if r["clip_id"] != redone]
    assert windows_of_rows(rows) == windows_of_metas(out)


def test_compact_is_optimize_and_vacuum_and_keeps_every_row(clip_folder, tmp_path, capsys):
    clips, out = own_run(clip_folder, tmp_path)
    make_clip(str(clips / "c9.mp4"), 16, 10.0, 96, 64)  # a new clip: a second data file
    run_job(delta_args(str(clips), out), release_models=False)
    make_clip(str(clips / "c0.mp4"), 40, 10.0, 96, 64)  # a redo: its commit rewrites the first data file
    run_job(delta_args(str(clips), out), release_models=False)
    rows, files_before = polars_rows(out), len(data_files(out))
    assert files_before == 3 and len(rows) == 3 + 2 + 3 + 3 + 1
    counts = compact([out, "--retention-hours", "0"])
    assert "(Delta table)" in capsys.readouterr().out
    assert counts["files_before"] == 2 and counts["files_after"] == 1 and counts["files_merged"] == 2
    assert counts["files_vacuumed"] == 3
    assert len(data_files(out)) == 1, "vacuum deleted the files optimize and the redo replaced"
    assert polars_rows(out) == rows and counts["rows"] == len(rows) and counts["clips_in_table"] == 5
    assert [h["operation"] for h in history(out)][-3:] == ["OPTIMIZE", "VACUUM START", "VACUUM END"]
    # the plain Parquet steps never run on a Delta table: no manifest, no journals, no merged part files
    assert not os.path.exists(os.path.join(out, "captions", "_manifest.json"))
    assert not os.path.exists(os.path.join(out, "_compact"))
    again = compact([out, "--retention-hours", "0"])
    assert again["files_merged"] == 0 and polars_rows(out) == rows


def test_staged_rows_a_killed_job_left_are_committed_by_compact(tmp_path):
    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(5)]  # killed before its committer ran
    assert not os.path.exists(os.path.join(out, "captions", "_delta_log")) and len(staged_files(out)) == 5
    counts = compact([out, "--retention-hours", "0"])
    assert counts["delta_clips_committed"] == 5
    rows = polars_rows(out)
    assert sorted({r["clip_id"] for r in rows}) == sorted(ids) and len(rows) == 15
    assert staged_files(out) == []


def test_staged_rows_a_killed_job_left_are_committed_by_the_next_run(clip_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(3)]
    redone = stage_synthetic_clip(out, 0, windows=1, tag="second")  # written again before the kill
    assert len(staged_files(out)) == 4  # the first write of clip 0 is superseded: no metas names it
    counts = run_job(delta_args(str(clip_folder), out), release_models=False)
    assert counts["clips"] == 4 and counts.get("delta_clips_committed") == 4  # this run's own clips
    told = capsys.readouterr()
    assert f"beam-captions: committed 3 clips an earlier run left staged in {out}" in told.err
    assert re.search(r"delta table      4 clips committed in \d+ commits? \(0 retried after a conflict\)", told.out)
    rows = polars_rows(out)
    staged_rows = [r for r in rows if r["clip_id"] in ids]
    assert sorted((r["clip_id"], r["caption"]) for r in staged_rows) == sorted(
        [(redone, "second 0/0")] + [(clip_id, f"first {n}/{i}") for n, clip_id in enumerate(ids[1:], 1)
                                    for i in range(3)])
    assert len(rows) == len(staged_rows) + 10
    assert [s[1] for s in staged_files(out)] == [redone], "only the superseded write is left (a young file)"
    commit_leftovers(out, now=os.path.getmtime(glob.glob(os.path.join(out, "_delta_staging", "*.arrow"))[0]) + 7 * 3600)
    assert staged_files(out) == [], "an unnamed staged file is deleted once it is old"


def test_a_commit_killed_before_its_clean_up_is_done_again_without_duplicates(tmp_path):
    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(4)]
    saved = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "_delta_staging", "*.arrow"))}
    commit_clips(out, ids)
    for path, data in saved.items():  # killed after the commit, before the deletions
        open(path, "wb").write(data)
    first, second = commit_clips(out, ids[:2]), commit_clips(out, ids[2:])  # retried, its batch cut in two
    assert first["delta_commits_replacing"] == second["delta_commits_replacing"] == 1  # the index finds them
    assert len(polars_rows(out)) == 12
    for path, data in saved.items():  # and once more, found by the next run's start
        open(path, "wb").write(data)
    assert commit_leftovers(out)["delta_clips_committed"] == 4
    assert len(polars_rows(out)) == 12 and staged_files(out) == []


def test_two_committers_at_once_both_land_after_a_retry(tmp_path):
    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(4)]
    commit_clips(out, ids)  # the four clips in one data file
    for number in range(4):  # each written again: both commits below replace rows of that one file
        stage_synthetic_clip(out, number, windows=2, tag="again")
    results: dict[str, dict] = {}

    def other_committer():
        results["b"] = commit_clips(out, ids[2:])

    def race(attempt):  # between loading the table and committing, another committer commits
        if attempt == 0:
            thread = threading.Thread(target=other_committer)
            thread.start()
            thread.join()

    results["a"] = commit_clips(out, ids[:2], before_commit=race)
    assert results["b"]["delta_commit_retries"] == 0 and results["a"]["delta_commit_retries"] == 1
    rows = polars_rows(out)
    assert sorted((r["clip_id"], r["window_index"], r["caption"].split()[0]) for r in rows) == sorted(
        (clip_id, i, "again") for clip_id in ids for i in range(2))


def test_concurrent_committers_in_threads_lose_no_batch(tmp_path):
    out = str(tmp_path / "out")
    batches = [[stage_synthetic_clip(out, 10 * t + n) for n in range(3)] for t in range(4)]
    commit_clips(out, [c for batch in batches for c in batch])  # then each batch replaces (can conflict)
    for t, batch in enumerate(batches):
        for n in range(3):
            stage_synthetic_clip(out, 10 * t + n, windows=1, tag="redo")
    barrier = threading.Barrier(len(batches))
    errors: list[BaseException] = []

    def committer(batch):
        try:
            commit_clips(out, batch, before_commit=lambda attempt: attempt or barrier.wait())
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=committer, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    rows = polars_rows(out)
    assert sorted((r["clip_id"], r["caption"].split()[0]) for r in rows) == sorted(
        (clip_id, "redo") for batch in batches for clip_id in batch)


def test_a_run_is_refused_on_an_output_of_the_other_format(clip_folder, first_run, tmp_path, capsys):
    parquet_out = str(tmp_path / "parquet")
    run_job(previews_args(str(clip_folder), parquet_out) + ["--no-gallery"], release_models=False)
    capsys.readouterr()
    for args, held in ((delta_args(str(clip_folder), parquet_out), "a plain Parquet table"),
                       (previews_args(str(clip_folder), first_run), "a Delta table")):
        with pytest.raises(SystemExit) as refused:
            run_job(args, release_models=False)
        error = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and held in error and len(error.splitlines()) == 1, error
    assert not os.path.exists(os.path.join(parquet_out, "_delta_staging"))
    assert not os.path.exists(os.path.join(parquet_out, "captions", "_delta_log"))


def test_the_staging_area_is_outside_the_table(tmp_path):
    out = str(tmp_path / "out")
    clip_id = stage_synthetic_clip(out, 1)
    meta = metas(out)[clip_id]
    assert meta["captions_staged"].startswith(f"{delta.STAGING}/{clip_id}-")
    assert os.path.exists(os.path.join(out, meta["captions_staged"]))
    assert not os.path.exists(os.path.join(out, "captions"))


def test_a_redo_that_leaves_no_window_removes_the_clips_rows(tmp_path):
    from beam_captions.records import Failure

    out = str(tmp_path / "out")
    ids = [stage_synthetic_clip(out, number) for number in range(2)]
    commit_clips(out, ids)
    source = metas(out)[ids[0]]["source"]
    broken = Failure(source, ids[0], "prepare", "ValueError", "not a video any more", windows_before=0,
                     source_version=(9999, 2.0))  # the file was replaced
    assert write_clip(out, ids[0], [broken], captions_table="delta")
    commit_clips(out, ids[:1])
    assert {r["clip_id"] for r in polars_rows(out)} == {ids[1]}
    assert metas(out)[ids[0]]["status"] == "failed"


def test_a_streaming_write_commits_to_the_delta_table(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue
    from test_streaming import T0, clip_elements

    from beam_captions.transforms.write import WriteOutputs

    out = str(tmp_path / "out")
    stream = (
        TestStream()
        .advance_watermark_to(T0)
        .add_elements([TimestampedValue(e, T0 + 5) for e in clip_elements("first", 2, T0 + 5)])
        .add_elements([TimestampedValue(e, T0 + 65) for e in clip_elements("second", 3, T0 + 65)])
        .advance_watermark_to(T0 + 200)
        .add_elements([TimestampedValue(e, T0 + 30) for e in clip_elements("late", 1, T0 + 30)])
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        p | stream | WriteOutputs(out, window_seconds=60, captions_table="delta")
    rows = polars_rows(out)
    assert windows_of_rows(rows) == windows_of_metas(out) and len(rows) == 6
    assert "window" not in rows[0], "a Delta output is not partitioned"
    assert staged_files(out) == [] and not glob.glob(os.path.join(out, "captions", "window=*"))


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_the_dataflow_graph_has_one_committer_on_cpu_workers(mode):
    from gcs import storage_emulator
    from test_runners import ACCELERATOR, ACCELERATOR_URN, BUCKET, dataflow_args, dry_run_graph, leaf_environments

    with storage_emulator(BUCKET):
        argv = ["--input", f"gs://{BUCKET}/raw/", "--output", f"gs://{BUCKET}/out", "--generate-previews",
                "--captions-table", "delta", "--accelerator", ACCELERATOR,
                *(["--streaming", "--streaming"] if mode == "streaming" else [])]  # the CLI's flag, then Beam's
        proto, _ = dry_run_graph(argv + dataflow_args(f"gs://{BUCKET}", dry_run=True))
    names = [t.unique_name for t in proto.components.transforms.values()]
    committer = [name for name in names if name.startswith("WriteOutputs/CommitToDelta/")]
    assert "WriteOutputs/CommitToDelta/Commit" in committer
    batching = "WriteOutputs/CommitToDelta/Batch" + ("/ParDo(_GroupIntoBatchesDoFn)" if mode == "streaming" else "")
    assert batching in committer and ("WriteOutputs/CommitToDelta/Gather" in committer) == (mode == "batch")
    leaves = leaf_environments(proto)
    assert not any(ACCELERATOR_URN in leaves[name].resource_hints for name in committer if name in leaves)
