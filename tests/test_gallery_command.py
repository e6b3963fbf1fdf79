"""``beam-captions gallery OUT`` on a local folder and on an emulated bucket; ``--no-gallery``; gs:// source versions."""

from __future__ import annotations

import json
import os

import pytest
from clips import make_clip
from gcs import gcs  # noqa: F401  (the module-scoped fixture)

from beam_captions.cli import main, run_job
from beam_captions.io import files
from beam_captions.transforms.skip_finished import source_version


def clip_meta(number: int) -> dict:
    clip_id = f"00000000-0000-0000-0000-{number:012d}"
    return {"version": 2, "clip_id": clip_id, "source": f"gs://in-bucket/raw/clip-{number:04d}.mp4", "status": "done",
            "width": 64, "height": 48, "fps": 10.0, "num_frames": 20, "codec": "h264", "duration_s": 2.0,
            "warnings": [], "errors": [],
            "windows": [{"window_index": 0, "start_frame": 0, "end_frame": 19, "start_s": 0.0, "end_s": 2.0,
                         "sampled_frames": [0, 19], "caption": f"caption of clip {number}", "preview": None}]}


def test_the_gallery_command_builds_pages_from_a_bucket_reading_metas_on_threads(gcs, monkeypatch, capsys):  # noqa: F811
    gcs.create_bucket("gallery-bucket")
    out = "gs://gallery-bucket/run"
    for number in range(120):
        gcs.upload_bytes(json.dumps(clip_meta(number)).encode(), f"{out}/metas/{clip_meta(number)['clip_id']}.json")
    gcs.upload_bytes(json.dumps({"source": "gs://in-bucket/raw/bad.mp4", "clip_id": None, "stage": "prepare",
                                 "error_type": "ValueError", "message": "not a video", "window_index": None}).encode(),
                     f"{out}/failures/x_clip_prepare.json")
    threads = []
    executor = files.ThreadPoolExecutor

    def recording(*args, **kwargs):
        threads.append(kwargs.get("max_workers"))
        return executor(*args, **kwargs)

    monkeypatch.setattr(files, "ThreadPoolExecutor", recording)
    assert main(["gallery", out]) == 0
    assert capsys.readouterr().out.startswith(f"{out}/index.html")
    assert max(threads) == 16
    objects = gcs.list(f"{out}/")
    assert {f"{out}/index.html", f"{out}/index-2.html", f"{out}/index-3.html"} <= set(objects)
    pages = "".join(gcs.read(f"{out}/{name}").decode() for name in ("index.html", "index-2.html", "index-3.html"))
    assert all(f"caption of clip {n}<" in pages for n in range(120)) and "not a video" in pages


def test_the_gallery_command_on_a_local_output_and_no_gallery_for_a_run(tmp_path):
    clips, out = tmp_path / "clips", tmp_path / "out"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 20, 10.0, 96, 64)
    counts = run_job(["--input", str(clips), "--output", str(out), "--generate-previews", "--no-gallery",
                      "--preview-target-height", "16"])
    assert counts["clips"] == 1 and not os.path.exists(out / "index.html")
    assert main(["gallery", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert page.count('<div class="window"') == 1 and "a.mp4" in page


def test_a_gs_source_version_is_its_size_and_update_time_and_changes_with_a_new_upload(gcs, tmp_path):  # noqa: F811
    gcs.create_bucket("version-bucket")
    uri = "gs://version-bucket/raw/a.mp4"
    gcs.upload_bytes(b"x" * 10, uri)
    first = source_version(uri)
    assert first is not None and first[0] == 10 and first[1] > 0
    gcs.upload_bytes(b"y" * 12, uri)
    assert source_version(uri)[0] == 12 and source_version("gs://version-bucket/raw/missing.mp4") is None


def _refused(argv: list[str], capsys) -> str:
    """The one line ``main(argv)`` refuses with, after checking it exits with status 2 and prints nothing else."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and printed.err.startswith("beam-captions: error: ")
    return printed.err


def test_the_gallery_command_on_a_missing_folder_creates_nothing_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _refused(["gallery", "no-such-out"], capsys) == "beam-captions: error: gallery no-such-out: no such folder\n"
    (tmp_path / "a-file").write_text("x")
    assert "gallery a-file: not a folder" in _refused(["gallery", "a-file"], capsys)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_the_gallery_command_on_a_folder_that_is_no_output_writes_nothing_and_exits_2(tmp_path, capsys):
    folder = tmp_path / "not-an-output"
    (folder / "captions").mkdir(parents=True)  # no metas/ and no failures/: not what a run leaves
    (folder / "notes.txt").write_text("x")
    line = _refused(["gallery", str(folder)], capsys)
    assert line == (f"beam-captions: error: gallery {folder}: not the output of a run "
                    "(no metas/ or failures/ under it)\n")
    assert sorted(os.listdir(folder)) == ["captions", "notes.txt"] and not os.listdir(folder / "captions")
    (folder / "failures").mkdir()  # an output whose clips all failed (or none yet): a gallery
    assert main(["gallery", str(folder)]) == 0 and (folder / "index.html").is_file()


def test_the_gallery_command_on_a_gs_prefix_without_metas_or_failures_writes_nothing(gcs, capsys):  # noqa: F811
    gcs.create_bucket("no-output-bucket")
    gcs.upload_bytes(b"x", "gs://no-output-bucket/other/notes.txt")
    for out in ("gs://no-output-bucket/no-such-out", "gs://no-output-bucket/other"):
        assert "not the output of a run (no metas/ or failures/ under it)" in _refused(["gallery", out], capsys)
    assert gcs.list("gs://no-output-bucket/") == ["gs://no-output-bucket/other/notes.txt"]
    gcs.upload_bytes(b"{}", "gs://no-output-bucket/other/failures/x_clip_prepare.json")
    assert main(["gallery", "gs://no-output-bucket/other"]) == 0
    assert gcs.exists("gs://no-output-bucket/other/index.html")
