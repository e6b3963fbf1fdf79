"""Clear errors before any work, and outputs a user can share (issue 15, section 4)."""

from __future__ import annotations

import errno
import os
import re
import socket
import stat

import pytest
from clips import make_clip

from beam_captions.cli import main, run_job
from beam_captions.io.files import write_bytes
from beam_captions.options import parse_args


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "a.mp4", 8, 25.0, 32, 32)
    return folder


def refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_output_that_cannot_be_written_is_one_line_before_any_clip_is_decoded(tmp_path, clips, capsys, monkeypatch):
    import beam_captions.transforms.prepare as prepare

    decoded = []
    monkeypatch.setattr(prepare, "iter_decode", lambda *a, **k: decoded.append(a) or iter(()))
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x")
    err = refusal(capsys, ["--input", str(clips), "--output", str(in_the_way), "--generate-previews"])
    assert str(in_the_way) in err and "is a file, not a folder" in err
    err = refusal(capsys, ["--input", str(clips), "--output", str(in_the_way / "out"), "--generate-previews"])
    assert str(in_the_way / "out") in err and "Not a directory" in err
    out = tmp_path / "out"
    (out).mkdir()
    (out / "metas").write_text("x")
    err = refusal(capsys, ["--input", str(clips), "--output", str(out), "--generate-previews"])
    assert str(out / "metas") in err and "is a file, not a folder" in err
    assert decoded == []


def test_a_write_that_fails_mid_run_is_one_line_and_the_summary(tmp_path, clips, capsys, monkeypatch):
    import beam_captions.io.clip_output as write

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(write, "write_bytes", disk_full)  # rows and the metas
    with pytest.raises(SystemExit) as stopped:
        run_job(["--input", str(clips), "--output", str(tmp_path / "out"), "--local-workers", "1", "--generate-previews"])
    assert stopped.value.code == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("beam-captions: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], captured.err[-3000:]
    assert "clips found      1" in captured.out
    # the summary's first line says the run broke, and why (never "finished")
    first = captured.out.splitlines()[0]
    assert re.fullmatch(r"beam-captions broke after \d+\.\d s: " + re.escape(errors[0][len("beam-captions: error: "):]),
                        first), first
    assert "finished in" not in captured.out


@pytest.mark.parametrize("flag", ["--captioning-sampling-fps", "--preview-target-fps", "--watch-interval-seconds",
                                  "--window-seconds", "--clip-time-budget-seconds"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_infinite_or_nan_values_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--input", "i", "--output", "o", flag, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1


def test_a_preview_height_beyond_webp_is_refused(capsys):
    parse_args(["--input", "i", "--output", "o", "--preview-target-height", "16383"])
    with pytest.raises(SystemExit):
        parse_args(["--input", "i", "--output", "o", "--preview-target-height", "16384"])
    assert "at most 16383" in capsys.readouterr().err


def test_a_missing_model_dir_is_reported_without_being_created(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port nobody listens on: never the real hub
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    missing = tmp_path / "modles" / "captioner"  # a typo
    with pytest.raises(SystemExit):
        parse_args(["--input", "i", "--output", "o", "--generate-captions", "--model-dir", str(missing)])
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_the_usual_permissions(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_bytes(str(tmp_path / "x" / "file.json"), b"{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "x" / "file.json").st_mode) == mode


def test_a_run_writes_shareable_files(tmp_path, clips):
    previous = os.umask(0o022)
    try:
        run_job(["--input", str(clips), "--output", str(tmp_path / "out"), "--generate-previews",
                 "--preview-target-height", "16"])
    finally:
        os.umask(previous)
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "out") for name in names]
    assert len(files) >= 4  # metas, rows, preview, gallery
    assert {stat.S_IMODE(os.stat(path).st_mode) for path in files} == {0o644}
