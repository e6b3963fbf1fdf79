"""True times for variable frame rate (issue 15, section 3): window times from the frames' presentation
timestamps, model frames sampled by time, and an edit list that does not make a clip decode twice."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from test_bad_inputs import make_vfr_clip

from beam_captions import progress
from beam_captions.inference.frame_bounds import DEFAULT_FRAME_BOUNDS
from beam_captions.media.decode import decode_windows

SIZING = {"frame_size": DEFAULT_FRAME_BOUNDS.frame_size}  # the pipeline's default model frame sizing

FFMPEG, FFPROBE = "/usr/bin/ffmpeg", "/usr/bin/ffprobe"


def frame_times(path: str) -> list[float]:
    """ffprobe's presentation time of every frame, from the first one."""
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_frames", "-show_entries",
                          "frame=pts_time,best_effort_timestamp_time", "-of", "json", path],
                         check=True, capture_output=True, text=True).stdout
    frames = json.loads(out)["frames"]
    times = sorted(float(f.get("pts_time", f.get("best_effort_timestamp_time"))) for f in frames)
    return [t - times[0] for t in times]


def test_window_times_come_from_the_frames_timestamps(tmp_path):
    clip = make_vfr_clip(str(tmp_path / "vfr.mp4"), num_frames=40)  # 80 ms and 20 ms frames in turn
    truth = frame_times(clip)
    info, windows = decode_windows(clip, window_size=7, remainder_threshold=4, sampling_fps=4.0, **SIZING)
    assert info.num_frames == len(truth) == 40
    for decoded in windows:
        window = decoded.window
        assert decoded.start_s == pytest.approx(truth[window.start], abs=1e-3)
        if window.end + 1 < len(truth):
            assert decoded.end_s == pytest.approx(truth[window.end + 1], abs=1e-3)
    assert info.duration_s == pytest.approx(windows[-1].end_s)
    # by index / average fps (the old way) odd windows would start 30 ms away from their first frame
    average_fps = 40 / info.duration_s
    assert max(abs(w.window.start / average_fps - truth[w.window.start]) for w in windows) >= 0.025


def test_model_frames_are_sampled_by_time(tmp_path):
    clip = make_vfr_clip(str(tmp_path / "vfr.mp4"), num_frames=40)
    truth = np.array(frame_times(clip))
    _, windows = decode_windows(clip, window_size=40, remainder_threshold=4, sampling_fps=4.0, **SIZING)
    (decoded,) = windows
    picked = truth[decoded.frame_indices]
    wanted = np.linspace(truth[0], truth[-1], len(decoded.frame_indices))
    shown = [truth[truth <= t + 1e-9].max() for t in wanted]  # the frame on screen at each wanted time
    assert np.allclose(picked, shown)


def test_an_edit_list_does_not_make_a_clip_decode_twice(tmp_path):
    base = str(tmp_path / "base.mp4")
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-t", "4",
                    "-c:v", "libx264", "-g", "50", "-pix_fmt", "yuv420p", base], check=True)
    cut = str(tmp_path / "cut.mp4")  # starts between key frames: an edit list hides the frames before 1.3 s
    subprocess.run([FFMPEG, "-loglevel", "error", "-ss", "1.3", "-i", base, "-t", "1.5", "-c", "copy", cut], check=True)
    shown = len(frame_times(cut))
    progress._reset()
    info, windows = decode_windows(cut, window_size=16, remainder_threshold=8, sampling_fps=2.0, **SIZING)
    assert info.num_frames == shown
    assert "decoded_twice" not in dict(info.warnings)
    assert not progress.snapshot().get("warnings_decoded_twice")
