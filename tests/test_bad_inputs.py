"""A corpus of bad and odd inputs in one folder with good clips: every input is accounted for once."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from fractions import Fraction

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from audit import run_command
from clips import make_audio_file, make_clip, make_png, synthetic_frame

from beam_captions.media.windowing import compute_windows
from beam_captions.samples import sample_clip_paths

WS, THR = 32, 16


def make_vfr_clip(path: str, num_frames: int = 40) -> str:
    """Frame intervals alternate between 20 ms and 80 ms."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, 64, 48), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += 20 if i % 2 else 80
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_huge_declared_clip(path: str) -> str:
    """Four black 9000x9000 frames (81 Mpx each), cheap to encode as MJPEG."""
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 9000, 9000, "yuvj420p"
        black = av.VideoFrame.from_ndarray(np.zeros((9000, 9000, 3), np.uint8), format="rgb24")
        for _ in range(4):
            container.mux(stream.encode(black.reformat(format="yuvj420p")))
        container.mux(stream.encode(None))
    return path


# a previews-only run: a clip of fewer frames than a caption window needs (three-frames.mp4, the one-frame
# png.mp4) still gets its preview
EXPECTED_FAILURES = {"zero.mp4", "text.mp4", "audio-only.mp4", "truncated.mp4", "huge.mp4"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    f = lambda name: str(folder / name)  # noqa: E731
    open(f("zero.mp4"), "wb").close()
    open(f("text.mp4"), "w").write("just some text\n")
    make_png(f("png.mp4"))
    make_audio_file(f("audio-only.mp4"))
    make_clip(f("three-frames.mp4"), 3, 10.0, 64, 48)
    make_clip(f("four-frames.mp4"), 4, 10.0, 64, 48)
    make_clip(f("odd 321x241.mp4"), 50, 25.0, 321, 241, pix_fmt="yuv444p")
    make_clip(f("rotated.mp4"), 40, 30.0, 96, 64, rotation_degrees=90)
    make_clip(f("ten-bit.mp4"), 40, 24.0, 64, 48, pix_fmt="yuv420p10le")
    make_vfr_clip(f("vfr.mp4"))
    make_huge_declared_clip(f("huge.mp4"))
    make_clip(f("clip é 空 with spaces.mkv"), 70, 25.0, 64, 48, container_format="matroska")
    bikes = sample_clip_paths()["bikes.mp4"]
    shutil.copyfile(bikes, f("good bikes.mp4"))
    data = open(bikes, "rb").read()
    open(f("truncated.mp4"), "wb").write(data[: len(data) // 2])  # moov atom at the end is lost
    mkv = open(f("clip é 空 with spaces.mkv"), "rb").read()
    open(f("truncated-mid-stream.mkv"), "wb").write(mkv[: int(len(mkv) * 0.6)])
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    out = str(tmp_path_factory.mktemp("out"))
    command = [sys.executable, "-m", "beam_captions", "--input", corpus, "--input", os.path.join(corpus, "good bikes.mp4"),
               "--output", out, "--generate-previews", "--captioning-window-size", str(WS),
               "--captioning-remainder-threshold", str(THR), "--preview-target-height", "32"]
    result = run_command(command, timeout=300)  # its summary audited against the output
    return out, result


def test_the_process_exits_0_and_its_summary_counts_every_input(run, corpus):
    out, result = run
    assert result.returncode == 0, result.stderr[-2000:]
    inputs = len(os.listdir(corpus))
    assert f"clips found      {inputs}" in result.stdout  # the clip named twice is read once
    assert f"clips failed     {len(EXPECTED_FAILURES)}" in result.stdout
    assert f"failures         {len(EXPECTED_FAILURES)} (prepare {len(EXPECTED_FAILURES)})" in result.stdout


def test_every_input_has_exactly_one_metas_and_bad_ones_a_clear_failure(run, corpus):
    out, _ = run
    metas = [json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json"))]
    sources = sorted(os.path.basename(m["source"]) for m in metas)
    assert sources == sorted(os.listdir(corpus))
    failures = {os.path.basename(r["source"]): r for r in
                (json.load(open(p)) for p in glob.glob(os.path.join(out, "failures", "*.json")))}
    assert set(failures) == EXPECTED_FAILURES
    assert "empty (0 bytes)" in failures["zero.mp4"]["message"]
    assert "no video stream" in failures["audio-only.mp4"]["message"]
    assert "exceed the limit" in failures["huge.mp4"]["message"]
    assert all(r["stage"] == "prepare" and r["error_type"] and r["message"] for r in failures.values())


def test_good_and_odd_clips_have_complete_outputs(run, corpus):
    out, _ = run
    table = pq.read_table(os.path.join(out, "captions")).to_pylist()
    by_source = {}
    for row in table:
        by_source.setdefault(os.path.basename(row["source"]), []).append((row["start_frame"], row["end_frame"]))
        assert os.path.isfile(row["preview"])
    assert not set(by_source) & EXPECTED_FAILURES
    expected_frames = {"four-frames.mp4": 4, "odd 321x241.mp4": 50, "rotated.mp4": 40, "ten-bit.mp4": 40,
                       "vfr.mp4": 40, "clip é 空 with spaces.mkv": 70}
    for name, frames in expected_frames.items():
        assert sorted(by_source[name]) == [(w.start, w.end) for w in compute_windows(frames, WS, THR)], name
    assert len(by_source["good bikes.mp4"]) == len(compute_windows(250, WS, THR))
    assert by_source["three-frames.mp4"] == [(0, 2)] and by_source["png.mp4"] == [(0, 0)]
    assert "truncated-mid-stream.mkv" in by_source  # what could be decoded is kept


def test_hostile_file_names_cannot_steer_outputs_or_reach_a_shell(tmp_path, monkeypatch):
    from beam_captions.cli import run_job

    clips, out = tmp_path / "in", tmp_path / "out"
    clips.mkdir()
    names = ["$(touch pwned).mp4", "<script>alert(1)<script>.mp4", "..evil;rm -rf ~.mp4", "`id`.mp4"]
    for name in names:
        make_clip(str(clips / name), 8, 10.0, 32, 32)
    monkeypatch.chdir(tmp_path)
    counts = run_job(["--input", str(clips), "--output", str(out), "--generate-previews", "--preview-target-height", "16"])
    assert counts["clips_found"] == len(names) and counts["windows"] == len(names)
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists(clips / "pwned")
    written = [os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "**", "*"), recursive=True) if os.path.isfile(p)]
    for path in written:
        assert not path.startswith(".."), path
        assert all(ch.isalnum() or ch in "-_./" for ch in path), path  # ids and frame numbers only
    page = open(out / "index.html", encoding="utf-8").read()
    assert "&lt;script&gt;alert(1)&lt;script&gt;.mp4" in page and "<script>alert" not in page


def test_remote_code_stays_off_unless_asked():
    from beam_captions.inference.engine import EngineSettings, llm_kwargs
    from beam_captions.options import parse_args

    config, _ = parse_args(["--input", "i", "--output", "o"])
    assert config.trust_remote_code is False and llm_kwargs(EngineSettings("m"))["trust_remote_code"] is False
    config, _ = parse_args(["--input", "i", "--output", "o", "--trust-remote-code"])
    assert config.trust_remote_code is True
