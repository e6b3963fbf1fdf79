"""Issue 21: no write can corrupt the captions table. Compaction checks what it read against what is
there (a replay after a kill, a writer during a compaction, two workers), the writer never changes a
merged file, ``read_captions`` gives every window once, and listing or reading errors fail a compaction
instead of being taken for "nothing there"."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os

import pyarrow.parquet as pq
import pytest
from gcs import gcs  # noqa: F401  (the module-scoped fixture)
from test_compact import metas, write_synthetic_clip

from beam_captions.cli import compact
from beam_captions.io import compaction
from beam_captions.io.compaction import list_caption_files, merge_group, plan_groups
from beam_captions.io.conditional import file_token, write_if_unchanged
from beam_captions.io.read_captions import read_captions
from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
from beam_captions.io.clip_output import write_clip


def redo(out: str, number: int, windows: int = 2, text: str = "redone") -> str:
    """Clip ``number`` written again from a new version of its source, with ``windows`` windows."""
    source = f"/videos/clip-{number:04d}.mp4"
    clip_id = clip_id_for(source)
    version = (5000 + number, 2.0)
    elements = [WindowRecord(clip_id, source, i, i * 16, i * 16 + 15, i * 1.6, i * 1.6 + 1.6, (i * 16,),
                             caption=f"{text} {number}/{i}", caption_model="m", source_version=version)
                for i in range(windows)]
    elements.append(ClipInfo(clip_id, source, 96, 64, 10.0, windows * 16, "h264", windows * 1.6, windows,
                             source_version=version))
    assert write_clip(out, clip_id, elements, asked={"captions": {"model": "m"}})
    return clip_id


def windows_once(rows: list[dict]) -> dict[tuple[str, int], str]:
    keys = [(r["clip_id"], r["window_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a window is there twice"
    return {(r["clip_id"], r["window_index"]): r["caption"] for r in rows}


def plain_rows(out: str) -> list[dict]:
    return pq.read_table(os.path.join(out, "captions")).to_pylist()


def expected(out: str) -> dict[tuple[str, int], str]:
    """Each clip's windows as its metas records them: what every reader must see."""
    return {(c, w["window_index"]): w["caption"] for c, m in metas(out).items() for w in m["windows"]}


def killed_at(step_name: str):
    def step(name: str) -> None:
        if name == step_name:
            raise KeyboardInterrupt(name)
    return step


@pytest.mark.parametrize("clip_was_in", ["its own file", "a merged file"])
def test_a_redo_between_a_killed_compaction_and_the_next_keeps_its_rows(tmp_path, clip_was_in):
    """The review's replay: compaction killed after its journal; a run redoes clip 0; the next compact
    finishes the old journal. The redone rows survive and the metas names them. Clip 0's rows were in
    its own file (a member the redo rewrites) or in a merged file of an earlier compaction (a member
    nobody changes: only the metas tells)."""
    out = str(tmp_path / "out")
    ids = [write_synthetic_clip(out, number) for number in range(3)]
    if clip_was_in == "a merged file":
        compact([out])
    ids += [write_synthetic_clip(out, number) for number in range(3, 6)]
    [group] = plan_groups(list_caption_files(out), 2**30)
    with pytest.raises(KeyboardInterrupt):
        merge_group(out, group, fail_after=killed_at("journal"))
    redone = redo(out, 0)
    assert windows_once(read_captions(out).to_pylist()) == expected(out)
    counts = compact([out])
    assert counts["compactions_finished"] == 1
    meta = metas(out)[redone]
    assert [w["caption"] for w in meta["windows"]] == ["redone 0/0", "redone 0/1"]
    rows = windows_once(plain_rows(out))
    assert rows == expected(out) and rows[(redone, 1)] == "redone 0/1" and len(rows) == 5 * 3 + 2
    assert all(m["captions_file"].startswith("captions/part-") for m in metas(out).values())
    assert set(ids) == set(metas(out))


@pytest.mark.parametrize("during", ["staged", "journal"])
def test_a_write_during_a_compaction_survives_with_each_window_once(tmp_path, during):
    """A caption run writes while compaction runs: a redo of a clip being merged and a new clip. Both
    survive, each window once, through the metas reader at once and through a plain read after the
    next compaction."""
    out = str(tmp_path / "out")
    for number in range(6):
        write_synthetic_clip(out, number)
    [group] = plan_groups(list_caption_files(out), 2**30)
    written = []

    def writer_runs(name: str) -> None:
        if name == during:
            written.extend([redo(out, 2), redo(out, 40, windows=1, text="new")])

    merge_group(out, group, fail_after=writer_runs)
    assert len(written) == 2
    want = expected(out)
    assert want[(written[0], 1)] == "redone 2/1" and want[(written[1], 0)] == "new 40/0"
    assert windows_once(read_captions(out).to_pylist()) == want
    assert metas(out)[written[0]]["captions_file"] == f"captions/{written[0]}.parquet"
    compact([out])
    assert windows_once(plain_rows(out)) == want == expected(out)


def _redo_in_process(out: str, numbers: list[int]) -> list[str]:
    return [redo(out, number) for number in numbers]


def test_two_workers_redoing_clips_of_one_merged_file_leave_no_duplicate(tmp_path):
    out = str(tmp_path / "out")
    for number in range(8):
        write_synthetic_clip(out, number)
    compact([out])
    [merged] = list_caption_files(out)
    before = open(os.path.join(out, merged.relpath), "rb").read()
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        done = pool.starmap(_redo_in_process, [(out, [0, 2, 4]), (out, [1, 3, 5])])
    assert open(os.path.join(out, merged.relpath), "rb").read() == before  # neither worker rewrote it
    want = expected(out)
    assert windows_once(read_captions(out).to_pylist()) == want and len(want) == 6 * 2 + 2 * 3
    compact([out])
    assert windows_once(plain_rows(out)) == want
    assert sorted(c for batch in done for c in batch) == sorted(c for c, m in metas(out).items()
                                                                if m["windows"][0]["caption"].startswith("redone"))


def test_a_commit_never_overwrites_a_metas_written_since_it_was_read(tmp_path, monkeypatch):
    """The race with no kill: the writer's metas lands between the compaction's check and its re-point.
    The conditional write refuses, and the clip is marked instead of pointed at its old rows."""
    out = str(tmp_path / "out")
    for number in range(4):
        write_synthetic_clip(out, number)
    [group] = plan_groups(list_caption_files(out), 2**30)
    target = clip_id_for("/videos/clip-0001.mp4")
    original = compaction.read_meta_with_token
    calls = {"n": 0}

    def late_writer(output, clip_id):
        found = original(output, clip_id)
        if clip_id == target:
            calls["n"] += 1
            if calls["n"] == 3:  # the re-point's own read: the writer lands right after it
                redo(out, 1)
        return found

    monkeypatch.setattr(compaction, "read_meta_with_token", late_writer)
    merge_group(out, group)
    assert calls["n"] == 3
    assert metas(out)[target]["captions_file"] == f"captions/{target}.parquet"
    assert windows_once(read_captions(out).to_pylist()) == expected(out)
    monkeypatch.undo()
    compact([out])
    assert windows_once(plain_rows(out)) == expected(out)


def test_a_listing_error_fails_the_compaction_and_keeps_what_a_journal_needs(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    for number in range(4):
        write_synthetic_clip(out, number)
    [group] = plan_groups(list_caption_files(out), 2**30)
    with pytest.raises(KeyboardInterrupt):
        merge_group(out, group, fail_after=killed_at("journal"))
    [staged] = glob.glob(os.path.join(out, "captions", "_tmp-*"))
    from apache_beam.io.filesystems import FileSystems

    real_match = FileSystems.match

    def flaky(patterns, *args, **kwargs):
        if any("_compact" in p for p in patterns):
            raise OSError("listing failed: 503")
        return real_match(patterns, *args, **kwargs)

    monkeypatch.setattr(FileSystems, "match", staticmethod(flaky))
    with pytest.raises(Exception, match="503"):
        compaction.remove_stray_files(out)
    assert os.path.exists(staged), "the staged file a journal names is kept"
    monkeypatch.undo()
    compact([out])
    assert windows_once(plain_rows(out)) == expected(out)


def test_a_metas_that_cannot_be_read_is_an_error_not_an_absent_metas(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    clip_id = write_synthetic_clip(out, 0)
    from beam_captions.io import files
    from beam_captions.io.metas import read_meta

    def unreadable(path, *args, **kwargs):
        raise PermissionError(f"{path}: permission denied")

    monkeypatch.setattr(files.FileSystems, "open", staticmethod(unreadable))
    with pytest.raises(PermissionError):
        read_meta(out, clip_id)


def test_a_clip_caught_between_its_rows_and_its_metas_is_not_read(tmp_path):
    out = str(tmp_path / "out")
    ids = [write_synthetic_clip(out, number) for number in range(3)]
    os.unlink(os.path.join(out, "metas", f"{ids[1]}.json"))  # a run killed between them
    assert {r["clip_id"] for r in read_captions(out).to_pylist()} == {ids[0], ids[2]}
    assert {r["clip_id"] for r in plain_rows(out)} == set(ids)  # what a plain read sees


def test_conditional_changes_on_a_bucket_refuse_a_newer_version(gcs):  # noqa: F811
    gcs.create_bucket("cond-bucket")
    path = "gs://cond-bucket/out/metas/x.json"
    assert write_if_unchanged(path, b"{}", None)
    token = file_token(path)
    assert not write_if_unchanged(path, b'{"a": 1}', None)  # it exists now
    gcs.upload_bytes(b'{"writer": true}', path)  # a writer's new version
    assert not write_if_unchanged(path, b'{"compaction": true}', token)
    assert json.loads(gcs.read(path)) == {"writer": True}


def test_the_replay_on_a_bucket_keeps_the_redone_rows(gcs, tmp_path):  # noqa: F811
    gcs.create_bucket("replay-bucket")
    out = "gs://replay-bucket/run"
    for number in range(4):
        write_synthetic_clip(out, number)
    [group] = plan_groups(list_caption_files(out), 2**30)
    with pytest.raises(KeyboardInterrupt):
        merge_group(out, group, fail_after=killed_at("journal"))
    redone = redo(out, 0)
    compact([out])
    meta = json.loads(gcs.read(f"{out}/metas/{redone}.json"))
    rows = read_captions(out).to_pylist()
    assert [r["caption"] for r in rows if r["clip_id"] == redone] == ["redone 0/0", "redone 0/1"]
    assert meta["captions_file"].startswith("captions/part-") and len(rows) == 3 * 3 + 2


def test_the_gallery_counts_the_table_through_read_captions(tmp_path):
    import re

    from beam_captions.io.gallery import write_gallery

    out = str(tmp_path / "out")
    for number in range(4):
        write_synthetic_clip(out, number)
    compact([out])
    redo(out, 1, windows=1)
    page = open(write_gallery(out)).read()
    counts = dict(re.findall(r'<li data-count="([^"]+)"><b>(\d+)</b>', page))
    assert counts["windows"] == counts["rows in the captions table"] == str(3 * 3 + 1)
    assert len(plain_rows(out)) == 3 * 4 + 1  # the merged file still holds the redone clip's three old rows
    import beam_captions

    assert beam_captions.read_captions(out).num_rows == 3 * 3 + 1
