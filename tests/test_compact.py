"""``beam-captions compact OUT`` (issue 14, section 4): few large files, every row exactly once, metas
pointing at their clip's file; idempotent, finished after a kill, and skip / gallery / redo keep working."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time

import pyarrow.parquet as pq
import pytest
from clips import make_clip
from gcs import gcs  # noqa: F401  (the module-scoped fixture)
from services import portable_services

from beam_captions.cli import compact, run_job
from beam_captions.io.compaction import MANIFEST, list_caption_files, merge_group, plan_groups
from beam_captions.io.gallery import write_gallery
from beam_captions.io.read_captions import read_captions
from beam_captions.records import ClipInfo, Failure, WindowRecord, clip_id_for
from beam_captions.io.clip_output import write_clip

NUM_CLIPS = 1000


def write_synthetic_clip(out: str, number: int, windows: int = 3, failed: bool = False) -> str:
    """One clip through the real writer (rows, metas), as a caption run leaves it."""
    source = f"/videos/clip-{number:04d}.mp4"
    clip_id = clip_id_for(source)
    version = (1000 + number, 1.0)
    elements = [
        WindowRecord(clip_id, source, i, i * 16, i * 16 + 15, i * 1.6, i * 1.6 + 1.6, (i * 16, i * 16 + 8),
                     caption=f"clip {number} window {i}: a person walks past a red car", caption_model="m",
                     caption_prompt_tokens=300 + i, source_version=version)
        for i in range(windows)
    ]
    elements.append(ClipInfo(clip_id, source, 96, 64, 10.0, windows * 16, "h264", windows * 1.6, windows,
                             source_version=version))
    if failed:
        elements.append(Failure(source, clip_id, "caption", "RuntimeError", "engine died", window_index=0))
    assert write_clip(out, clip_id, elements, asked={"captions": {"model": "m"}})
    return clip_id


def table_rows(out: str, through_metas: bool = False) -> list[tuple]:
    """Every row of ``OUT/captions`` as a plain reader of the folder gets it (``through_metas``: as
    ``read_captions`` does), sorted; asserts no window is there twice."""
    rows = (read_captions(out) if through_metas else pq.read_table(os.path.join(out, "captions"))).to_pylist()
    keys = [(r["clip_id"], r["window_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a window is in the table twice"
    return sorted(tuple(sorted(r.items())) for r in rows)


def metas(out: str) -> dict[str, dict]:
    return {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json"))}


def files_under(folder: str) -> dict[str, bytes]:
    return {os.path.relpath(p, folder): open(p, "rb").read()
            for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p)}


@pytest.fixture(scope="module")
def thousand(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("thousand"))
    for number in range(NUM_CLIPS):
        write_synthetic_clip(out, number, windows=1 + number % 4, failed=number % 100 == 7)
    return out


def assert_each_clip_in_its_file(out: str) -> None:
    """Every clip's metas names the one file holding its rows, and a row group never splits a clip."""
    where: dict[str, set] = {}
    for path in glob.glob(os.path.join(out, "captions", "**", "*.parquet"), recursive=True):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            for clip_id in set(parquet.read_row_group(group, columns=["clip_id"]).column("clip_id").to_pylist()):
                where.setdefault(clip_id, set()).add((os.path.relpath(path, out), group))
    for clip_id, meta in metas(out).items():
        assert where.get(clip_id) == {(meta["captions_file"], next(iter(where[clip_id]))[1])}, clip_id


def test_compact_gives_the_same_rows_in_a_few_files_and_a_manifest(thousand, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(thousand, out)
    before, files_before = table_rows(out), len(list_caption_files(out))
    started = time.monotonic()
    counts = compact([out, "--target-size-mb", "0.1"])
    seconds = time.monotonic() - started
    after = list_caption_files(out)
    print(f"compact: {files_before} files -> {len(after)} files, {len(before)} rows, {seconds:.1f} s")
    assert files_before == NUM_CLIPS and 2 <= len(after) <= 10
    assert all(os.path.basename(f.relpath).startswith("part-") for f in after)
    assert table_rows(out) == before
    assert counts["files_before"] == NUM_CLIPS and counts["files_after"] == len(after)
    assert_each_clip_in_its_file(out)
    manifest = json.load(open(os.path.join(out, "captions", MANIFEST)))
    assert manifest["rows"] == len(before) and manifest["clips"] == NUM_CLIPS
    assert sorted(f["path"] for f in manifest["files"]) == [f.relpath for f in after]
    assert sum(f["rows"] for f in manifest["files"]) == len(before)
    assert [c["name"] for c in manifest["schema"]][:3] == ["clip_id", "source", "window_index"]
    assert f"{files_before} before, {len(after)} after" in capsys.readouterr().out
    assert not glob.glob(os.path.join(out, "_compact", "*")), "a journal was left behind"


def test_compacting_again_changes_nothing(thousand, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(thousand, out)
    compact([out])  # default target: one file
    assert len(list_caption_files(out)) == 1
    first = {**files_under(os.path.join(out, "captions")), **files_under(os.path.join(out, "metas"))}
    counts = compact([out])
    assert counts.get("files_merged", 0) == 0
    assert {**files_under(os.path.join(out, "captions")), **files_under(os.path.join(out, "metas"))} == first


def test_stale_rows_are_dropped_and_an_unfinished_clip_is_left_for_its_run(tmp_path):
    out = str(tmp_path / "out")
    ids = [write_synthetic_clip(out, number) for number in range(6)]
    captions = os.path.join(out, "captions")
    shutil.copy(os.path.join(captions, f"{ids[0]}.parquet"), os.path.join(captions, "old-copy.parquet"))
    os.unlink(os.path.join(out, "metas", f"{ids[1]}.json"))  # killed after its rows, before its metas
    compact([out])
    rows = pq.read_table(captions).to_pylist()
    assert sorted({r["clip_id"] for r in rows}) == sorted(ids)
    assert len(rows) == len({(r["clip_id"], r["window_index"]) for r in rows}) == 6 * 3
    assert os.path.exists(os.path.join(captions, f"{ids[1]}.parquet"))  # not moved: no metas says it is done
    assert not os.path.exists(os.path.join(captions, "old-copy.parquet"))
    assert sorted(os.listdir(captions)) == sorted([f"{ids[1]}.parquet", MANIFEST, *[
        f for f in os.listdir(captions) if f.startswith("part-")]]) and len(os.listdir(captions)) == 3


@pytest.mark.parametrize("killed_after", ["staged", "journal"])
def test_a_compaction_killed_part_way_is_finished_by_the_next(tmp_path, killed_after, capsys):
    out = str(tmp_path / "out")
    for number in range(8):
        write_synthetic_clip(out, number)
    before = table_rows(out)

    def kill(step: str) -> None:
        if step == killed_after:
            raise KeyboardInterrupt(step)

    [group] = plan_groups(list_caption_files(out), 2**30)
    with pytest.raises(KeyboardInterrupt):
        merge_group(out, group, fail_after=kill)
    capsys.readouterr()
    counts = compact([out])
    lines = capsys.readouterr().out.splitlines()
    # the summary counts what the killed compaction left: its 8 small files (already merged) or its staged copy
    assert lines[1] == ("  leftovers        8 files removed: 8 already merged (1 killed compaction finished), "
                        "0 staged copies no journal names" if killed_after == "journal" else
                        "  leftovers        1 file removed: 0 already merged (0 killed compactions finished), "
                        "1 staged copy no journal names"), lines
    assert counts.get("leftover_files_removed", 0) == (8 if killed_after == "journal" else 0)
    assert lines[2:4] == ["  files            1 before, 1 after (0 merged into 0)" if killed_after == "journal" else
                          "  files            8 before, 1 after (8 merged into 1)",
                          "  rows             24 of 8 clips (0 stale rows dropped)"]  # as the README shows
    assert table_rows(out) == before
    assert len(list_caption_files(out)) == 1 and not glob.glob(os.path.join(out, "_compact", "*"))
    assert not glob.glob(os.path.join(out, "captions", "_tmp-*"))
    assert counts.get("compactions_finished", 0) == (killed_after == "journal")
    assert counts.get("staged_files_removed", 0) == (killed_after == "staged")
    assert_each_clip_in_its_file(out)


# Previews-only runs here pass release_models=False: the session's caption engine stays loaded for later tests.
def previews_args(clips: str, out: str) -> list[str]:
    return ["--input", clips, "--output", out, "--generate-previews", "--captioning-window-size", "16",
            "--captioning-remainder-threshold", "8", "--preview-target-height", "32", "--preview-target-fps", "4"]


def test_a_run_on_a_compacted_output_skips_redoes_and_keeps_rows_once(tmp_path):
    clips, out = tmp_path / "clips", str(tmp_path / "out")
    clips.mkdir()
    for number in range(5):
        make_clip(str(clips / f"c{number}.mp4"), 24 + 8 * number, 10.0, 96, 64)
    run_job(previews_args(str(clips), out) + ["--no-gallery"], release_models=False)
    before = table_rows(out)
    compact([out])
    [merged] = list_caption_files(out)
    assert table_rows(out) == before
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
              if "logs" not in p}
    counts = run_job(previews_args(str(clips), out), release_models=False)
    assert counts["clips_skipped"] == 5 and counts.get("clips", 0) == 0
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items() if not p.endswith(".html"))
    assert "c3.mp4" in open(write_gallery(out)).read()
    replaced = str(clips / "c3.mp4")
    make_clip(replaced, 26, 10.0, 96, 64)  # another file under the same name: two windows
    merged_bytes = open(os.path.join(out, merged.relpath), "rb").read()
    counts = run_job(previews_args(str(clips), out), release_models=False)
    assert counts["clips_replaced"] == 1 and counts["clips_skipped"] == 4
    assert open(os.path.join(out, merged.relpath), "rb").read() == merged_bytes, "a run never rewrites a merged file"
    rows = table_rows(out, through_metas=True)  # asserts each window once
    mine = [dict(r) for r in rows if dict(r)["clip_id"] == clip_id_for(replaced)]
    assert [(r["window_index"], r["end_frame"]) for r in mine] == [(0, 15), (1, 25)]
    assert len(pq.read_table(os.path.join(out, "captions")).to_pylist()) == len(rows) + 3  # the old rows, until compact
    assert not os.path.exists(os.path.join(out, "captions", MANIFEST)), "the manifest no longer describes the table"
    compact([out])
    assert table_rows(out) == rows and len(list_caption_files(out)) == 1
    assert not glob.glob(os.path.join(out, "_compact", "**", "*.json"), recursive=True)
    assert os.path.exists(os.path.join(out, "captions", MANIFEST))


def test_streaming_partitions_are_compacted_each_in_its_own_folder(tmp_path):
    out = str(tmp_path / "out")
    for number in range(6):
        source = f"/videos/s{number}.mp4"
        clip_id = clip_id_for(source)
        window = WindowRecord(clip_id, source, 0, 0, 15, 0.0, 1.6, (0, 8), caption="c", source_version=(1, 1.0))
        clip = ClipInfo(clip_id, source, 96, 64, 10.0, 16, "h264", 1.6, 1, source_version=(1, 1.0))
        write_clip(out, clip_id, [window, clip], partition=f"window=2026-12-01T0{number % 2}-00-00Z")
    before = pq.read_table(os.path.join(out, "captions")).to_pylist()
    compact([out])
    folders = sorted(os.path.dirname(f.relpath) for f in list_caption_files(out))
    assert folders == ["captions/window=2026-12-01T00-00-00Z", "captions/window=2026-12-01T01-00-00Z"]
    after = pq.read_table(os.path.join(out, "captions")).to_pylist()
    assert sorted(map(str, after)) == sorted(map(str, before)) and len(after) == 6
    assert {r["window"] for r in after} == {"2026-12-01T00-00-00Z", "2026-12-01T01-00-00Z"}


def test_compact_on_a_bucket(gcs, tmp_path):  # noqa: F811
    gcs.create_bucket("compact-bucket")
    out = "gs://compact-bucket/run"
    ids = [write_synthetic_clip(out, number) for number in range(12)]
    counts = compact([out])
    objects = gcs.list(f"{out}/captions/")
    [merged] = [uri for uri in objects if uri.endswith(".parquet")]
    assert counts["files_before"] == 12 and counts["files_after"] == 1 and f"{out}/captions/{MANIFEST}" in objects
    local = tmp_path / "merged.parquet"
    local.write_bytes(gcs.read(merged))
    rows = pq.read_table(str(local)).to_pylist()
    assert sorted({r["clip_id"] for r in rows}) == sorted(ids) and len(rows) == 36
    meta = json.loads(gcs.read(f"{out}/metas/{ids[0]}.json"))
    assert f"{out}/{meta['captions_file']}" == merged


def test_a_rerun_that_redoes_every_compacted_clip_leaves_the_merged_file_to_the_next_compaction(tmp_path):
    clips, out = tmp_path / "clips", str(tmp_path / "out")
    clips.mkdir()
    for number in range(6):
        make_clip(str(clips / f"c{number}.mp4"), 24 + 8 * number, 10.0, 96, 64)
    run_job(previews_args(str(clips), out) + ["--no-gallery"], release_models=False)
    compact([out])
    [merged] = list_caption_files(out)
    stamp = os.stat(os.path.join(out, merged.relpath)).st_mtime_ns
    counts = run_job(previews_args(str(clips), out)[:-1] + ["8", "--no-gallery", "--local-workers", "2"],
                     release_models=False)
    assert counts["clips_other_settings"] == 6  # other preview settings: every clip redone
    assert os.stat(os.path.join(out, merged.relpath)).st_mtime_ns == stamp  # the writer never rewrites it
    rows = table_rows(out, through_metas=True)
    assert len(rows) == sum(len(m["windows"]) for m in metas(out).values())
    assert {dict(r)["preview"].split("/")[-2] for r in rows} == set(metas(out))
    counts = compact([out])
    assert not os.path.exists(os.path.join(out, merged.relpath)) and counts["rows_stale_dropped"] == len(rows)
    assert table_rows(out) == rows


def test_compact_runs_on_the_portable_runner(thousand, tmp_path):
    """The compaction job through Beam's job service and an EXTERNAL worker pool (Flink's path): its steps
    pickle and run in an SDK worker of their own."""
    out = str(tmp_path / "out")
    shutil.copytree(thousand, out)
    before = table_rows(out)
    with portable_services(tmp_path / "services") as services:
        counts = compact([out, "--target-size-mb", "0.1", *services.runner_args()])
    assert counts["files_before"] == NUM_CLIPS and counts["files_after"] == len(list_caption_files(out)) <= 10
    assert table_rows(out) == before
    assert_each_clip_in_its_file(out)


def test_the_compaction_summary_says_how_it_ended_and_its_counts_are_grammatical(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_synthetic_clip(out, 0, windows=1)
    compact([out])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"beam-captions compact finished in \d+\.\d s", lines[0]), lines
    assert lines[1:3] == ["  files            1 before, 1 after (0 merged into 0)",  # no leftovers line: none
                          "  rows             1 of 1 clip (0 stale rows dropped)"]
    write_synthetic_clip(out, 1, windows=1)
    compact([out])
    assert capsys.readouterr().out.splitlines()[1:3] == ["  files            2 before, 1 after (2 merged into 1)",
                                                         "  rows             2 of 2 clips (0 stale rows dropped)"]


def test_compact_goes_ahead_on_an_output_a_live_run_holds_and_says_so_in_one_line(tmp_path, capsys):
    """The README's choice: ``compact`` does not need the lease (a run's writes during it are kept)."""
    from beam_captions.io.lease import Lease, describe_holder

    out = str(tmp_path / "out")
    for number in range(3):
        write_synthetic_clip(out, number)
    before = table_rows(out)
    lease = Lease.take(out)
    try:
        holder = json.load(open(os.path.join(out, "_lease.json")))
        counts = compact([out])
        said = capsys.readouterr().out.splitlines()
    finally:
        lease.release()
    def any_age(line: str) -> str:
        return re.sub(r"refreshed \d+ s ago", "refreshed N s ago", line)

    assert any_age(said[0]) == any_age(f"beam-captions compact: a run is writing to {out} ({describe_holder(holder)}); "
                                       "what it writes meanwhile is kept"), said
    assert said[1].startswith("beam-captions compact finished in ")
    assert counts["files_merged"] == 3 and len(list_caption_files(out)) == 1 and table_rows(out) == before
