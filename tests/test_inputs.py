"""Every video given is found, or the summary and the failure records say why not (issue 15, section 1)."""

from __future__ import annotations

import glob
import json
import os
import sys
import threading

import pytest
from audit import run_command
from clips import make_clip

from beam_captions import progress
from beam_captions.cli import main, run_job
from beam_captions.records import ClipRef, clip_id_for
from beam_captions.transforms.prepare import PrepareConfig, prepare_clip
from beam_captions.transforms.read import (
    VIDEO_EXTENSIONS, InputError, check_inputs, list_location, normalise_source, parse_extensions,
)

CAMERA_FORMATS = {  # name: (container format, codec, pixel format)
    "camcorder.MTS": ("mpegts", "libx264", "yuv420p"),
    "broadcast.mxf": ("mxf", "mpeg2video", "yuv420p"),
    "raw.y4m": ("yuv4mpegpipe", "rawvideo", "yuv420p"),
    "dvd.VOB": ("vob", "mpeg2video", "yuv420p"),
    "web.ogv": ("ogg", "libvpx", "yuv420p"),
}


def listed(location, extensions=None):
    progress._reset()
    paths = list(list_location(location, extensions))
    return paths, progress.snapshot()


@pytest.fixture
def folder(tmp_path):
    """Clips in camcorder, broadcast, raw and DVD containers, a clip without extension, and a text file."""
    root = tmp_path / "in"
    (root / "day 2").mkdir(parents=True)
    for name, (container, codec, pix_fmt) in CAMERA_FORMATS.items():
        make_clip(root / "day 2" / name, 8, 25.0, 32, 32, codec, pix_fmt, container_format=container)
    make_clip(root / "recording", 8, 25.0, 32, 32, container_format="mp4")
    (root / "day 2" / "notes.txt").write_text("not a video\n")
    return root


def test_a_scan_takes_every_common_container_in_any_case_and_counts_the_rest(folder):
    paths, counts = listed(str(folder))
    assert sorted(os.path.basename(p) for p in paths) == sorted(CAMERA_FORMATS)
    assert counts["files_ignored_not_video"] == 2  # recording (no extension), notes.txt
    for ext in (".mpv", ".m2v", ".mts", ".m2ts", ".vob", ".ogv", ".mxf", ".dv", ".y4m", ".mp4", ".mkv", ".webm"):
        assert ext in VIDEO_EXTENSIONS


def test_a_file_named_explicitly_is_taken_whatever_its_name(folder):
    assert listed(str(folder / "recording"))[0] == [str(folder / "recording")]
    notes = str(folder / "day 2" / "notes.txt")
    assert listed(notes)[0] == [notes]  # its failure record will say why


def test_input_extensions_replace_or_extend_the_set(folder):
    assert parse_extensions("MP4, .mov") == {".mp4", ".mov"}
    assert parse_extensions("+xyz") == VIDEO_EXTENSIONS | {".xyz"}
    assert parse_extensions("*") == {"*"}
    for bad in ("", "mp4,+xyz", "a/b"):
        with pytest.raises(ValueError):
            parse_extensions(bad)
    assert [os.path.basename(p) for p in listed(str(folder), parse_extensions("mts"))[0]] == ["camcorder.MTS"]
    paths, counts = listed(str(folder), parse_extensions("*"))
    assert len(paths) == len(CAMERA_FORMATS) + 2 and not counts.get("files_ignored_not_video")


def test_a_name_with_glob_characters_that_exists_is_that_file(tmp_path):
    for name in ("a[1].mp4", "a1.mp4", "movie [1080p].mp4"):
        (tmp_path / name).write_bytes(b"x")
    assert listed(str(tmp_path / "a[1].mp4"))[0] == [str(tmp_path / "a[1].mp4")]
    assert listed(str(tmp_path / "movie [1080p].mp4"))[0] == [str(tmp_path / "movie [1080p].mp4")]
    assert listed(str(tmp_path / "a?.mp4"))[0] == [str(tmp_path / "a1.mp4")]  # a name that does not exist is a glob
    folder = tmp_path / "shows [2020]"
    folder.mkdir()
    (folder / "e1.mp4").write_bytes(b"x")
    assert listed(str(folder))[0] == [str(folder / "e1.mp4")]


def test_one_file_reached_by_several_paths_is_one_clip_with_the_id_of_its_real_path(tmp_path, monkeypatch):
    real = tmp_path / "clips" / "a.mp4"
    real.parent.mkdir()
    real.write_bytes(b"x")
    os.symlink(real, tmp_path / "link.mp4")
    os.symlink(real.parent, tmp_path / "linked-folder")
    monkeypatch.chdir(tmp_path)
    forms = ["clips/a.mp4", "./clips/a.mp4", "clips/../clips/a.mp4", str(real), "link.mp4", "linked-folder/a.mp4"]
    real_path = os.path.realpath(real)
    assert {normalise_source(form) for form in forms} == {real_path}
    assert ClipRef.from_source(normalise_source(real_path)).clip_id == clip_id_for(real_path)  # ids kept
    assert normalise_source("gs://b/x.mp4") == "gs://b/x.mp4"
    counts = run_job(["--input", *forms, "--input", "linked-folder", "--output", str(tmp_path / "out"),
                     "--generate-previews"])
    assert counts["clips_found"] == 1
    (meta,) = glob.glob(str(tmp_path / "out" / "metas" / "*.json"))
    assert json.load(open(meta))["source"] == real_path


def _failure_of(path: str) -> str:
    (failure,) = list(prepare_clip(ClipRef.from_source(path), PrepareConfig(model_frames=False)))
    assert failure.stage == "prepare"
    return failure.message


def test_links_fifos_and_folders_named_like_videos_get_their_true_reason(tmp_path):
    scan = tmp_path / "scan"
    scan.mkdir()
    make_clip(scan / "good.mp4", 8, 25.0, 32, 32)
    os.symlink(tmp_path / "gone.mp4", scan / "dangling.mp4")
    os.symlink(scan / "loop.mp4", scan / "loop.mp4")
    os.mkfifo(scan / "pipe.mp4")
    (scan / "folder.mp4").mkdir()
    make_clip(scan / "folder.mp4" / "inner.mp4", 8, 25.0, 32, 32)
    paths, _ = listed(str(scan))
    names = sorted(os.path.relpath(p, scan) for p in paths)
    assert names == ["dangling.mp4", "folder.mp4", "folder.mp4/inner.mp4", "good.mp4", "loop.mp4", "pipe.mp4"]
    messages: dict[str, str] = {}
    worker = threading.Thread(target=lambda: messages.update(
        {name: _failure_of(str(scan / name)) for name in ("dangling.mp4", "loop.mp4", "pipe.mp4", "folder.mp4")}
    ), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "a FIFO was opened for reading"
    assert "dangling symbolic link" in messages["dangling.mp4"] and "gone.mp4" in messages["dangling.mp4"]
    assert "symbolic link that loops" in messages["loop.mp4"]
    assert "FIFO" in messages["pipe.mp4"] and "empty" not in messages["pipe.mp4"]
    assert "is a directory" in messages["folder.mp4"]


def test_missing_inputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"x")
    check_inputs([str(tmp_path), str(tmp_path / "x.mp4"), str(tmp_path / "*.mp4")])
    check_inputs([str(tmp_path / "later" / "*.mp4")], streaming=True)
    for missing in (str(tmp_path / "nope.mp4"), str(tmp_path / "nope"), str(tmp_path / "*.mkv"), ""):
        with pytest.raises(InputError):
            check_inputs([missing])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--input", "{tmp}/missing.mts", "--output", "{tmp}/out"], "missing.mts: no such file or folder"),
        (["--input", "{tmp}/no/such/dir", "--output", "{tmp}/out"], "no such folder"),
        (["--input", "", "--output", "{tmp}/out"], "--input must not be empty"),
        (["--input", "{tmp}", "--output", ""], "--output must not be empty"),
    ],
)
def test_the_cli_refuses_a_missing_or_empty_location_in_one_line_with_exit_2(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as stopped:
        main([arg.format(tmp=tmp_path) for arg in args] + ["--generate-previews"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not os.path.exists(tmp_path / "out")


def test_a_run_finds_camera_formats_and_names_what_it_ignored(folder, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "beam_captions", "--input", str(folder / "day 2"), "--input", str(folder / "recording"),
               "--output", str(out), "--generate-previews", "--preview-target-height", "16"]
    result = run_command(command, timeout=300)  # its summary audited against the output
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"clips found      {len(CAMERA_FORMATS) + 1}" in result.stdout
    assert "files ignored    1 (not video by name)" in result.stdout  # notes.txt
    assert "clips failed     0" in result.stdout, result.stdout
