"""Issue 29, part 7: a redo after a lost or unreadable metas supersedes the clip's rows in merged files (plain
Parquet output), says on the terminal that the metas could not be read, and leaves no stale manifest; and
``read_captions`` on a path with no output is an error naming the path."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from clips import make_clip
from gcs import gcs  # noqa: F401  (the module-scoped fixture)
from test_compact import previews_args, write_synthetic_clip
from test_table_safety import redo, windows_once

from beam_captions.cli import compact, run_job
from beam_captions.io.read_captions import read_captions
from beam_captions.records import clip_id_for


def manifest_rows(out: str):
    path = os.path.join(out, "captions", "_manifest.json")
    return json.load(open(path))["rows"] if os.path.exists(path) else None


def test_a_run_after_a_lost_and_an_unreadable_metas_gives_every_window_once(tmp_path, capfd):
    """The issue's case: compact an output, delete one metas and truncate another, run again."""
    clips, out = tmp_path / "clips", str(tmp_path / "out")
    clips.mkdir()
    for number in range(4):
        make_clip(str(clips / f"c{number}.mp4"), 24 + 8 * number, 10.0, 96, 64)
    run_job(previews_args(str(clips), out) + ["--no-gallery"], release_models=False)
    windows = read_captions(out).num_rows
    compact([out])
    assert manifest_rows(out) == windows
    lost, torn = (clip_id_for(str(clips / f"c{number}.mp4")) for number in (1, 3))
    os.unlink(os.path.join(out, "metas", f"{lost}.json"))
    with open(os.path.join(out, "metas", f"{torn}.json"), "r+") as handle:
        handle.truncate(40)
    capfd.readouterr()
    counts = run_job(previews_args(str(clips), out) + ["--no-gallery"], release_models=False)
    assert counts["clips"] == 2  # both are made again
    terminal = capfd.readouterr().err
    assert f"the metas of clip {torn}" in terminal and "could not be read" in terminal
    assert f"the metas of clip {lost}" not in terminal  # gone is not unreadable
    assert len(windows_once(read_captions(out).to_pylist())) == windows
    assert manifest_rows(out) in (None, windows), "a manifest that no longer describes the table"
    compact([out])
    assert len(windows_once(pq.read_table(os.path.join(out, "captions")).to_pylist())) == windows
    assert manifest_rows(out) == windows


def test_a_redo_after_a_lost_metas_on_a_bucket_supersedes_its_merged_rows(gcs):  # noqa: F811
    gcs.create_bucket("lost-metas")
    out = "gs://lost-metas/run"
    ids = [write_synthetic_clip(out, number) for number in range(4)]
    compact([out])
    gcs.client.bucket("lost-metas").blob(f"run/metas/{ids[2]}.json").delete()
    redo(out, 2)
    rows = windows_once(read_captions(out).to_pylist())
    assert len(rows) == 3 * 3 + 2 and rows[(ids[2], 0)] == "redone 2/0"
    assert not gcs.client.bucket("lost-metas").blob("run/captions/_manifest.json").exists()


def test_a_new_clip_on_a_compacted_output_marks_nothing(tmp_path):
    out = str(tmp_path / "out")
    for number in range(3):
        write_synthetic_clip(out, number)
    compact([out])
    write_synthetic_clip(out, 7)  # never written before: in no merged file
    assert not os.path.exists(os.path.join(out, "_compact", "superseded"))
    assert manifest_rows(out) is not None


@pytest.mark.parametrize("path", ["", "no/such/dir", "/etc"])
def test_read_captions_on_a_path_with_no_output_is_an_error_naming_it(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no beam-captions output at {path!r}"):
        read_captions(path)


def test_read_captions_on_an_output_without_captions_yet_is_an_empty_table(tmp_path):
    out = tmp_path / "out"
    (out / "metas").mkdir(parents=True)
    assert read_captions(str(out)).num_rows == 0
