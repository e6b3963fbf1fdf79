"""Frames the right way up and the right width (issue 15, section 2): display rotation and sample aspect
ratio applied to previews and model frames, checked against FFmpeg's own autorotate and scaling."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from beam_captions.inference.frame_bounds import DEFAULT_FRAME_BOUNDS
from beam_captions.media.decode import PreviewSpec, decode_windows, orientation_from_matrix

SIZING = {"frame_size": DEFAULT_FRAME_BOUNDS.frame_size}  # the pipeline's default model frame sizing

FFMPEG = "/usr/bin/ffmpeg"


def ffmpeg(*args: str) -> bytes:
    return subprocess.run([FFMPEG, "-loglevel", "error", "-y", *args], check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oriented")
    base = str(folder / "base.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x180:rate=25", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", base)
    made = {"base": base}
    for degrees in (90, 180, 270):
        made[f"rotate{degrees}"] = str(folder / f"rotate{degrees}.mp4")
        ffmpeg("-i", base, "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", made[f"rotate{degrees}"])
    made["sar"] = str(folder / "sar.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=720x576:rate=25", "-t", "1", "-vf", "setsar=16/11", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", made["sar"])
    return made


def first_preview(path: str, height: int = 240):
    info, windows = decode_windows(path, preview=PreviewSpec(target_fps=25.0, target_height=height), model_frames=False)
    return info, windows[0].preview_frames[0]


def ffmpeg_frame(path: str, width: int, height: int) -> np.ndarray:
    """FFmpeg's first frame as shown (autorotate on, square pixels), scaled to ``width x height``."""
    raw = ffmpeg("-i", path, "-frames:v", "1", "-vf", f"scale={width}:{height}:flags=area", "-f", "rawvideo",
                 "-pix_fmt", "rgb24", "-")
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_rotated_clip_is_previewed_the_right_way_up(clips, degrees):
    info, frame = first_preview(clips[f"rotate{degrees}"])
    expected_size = (136, 240) if degrees in (90, 270) else (426, 240)
    assert (frame.shape[1], frame.shape[0]) == expected_size
    assert (info.width, info.height) == (320, 180)
    assert (info.display_width, info.display_height) == ((180, 320) if degrees in (90, 270) else (320, 180))
    truth = ffmpeg_frame(clips[f"rotate{degrees}"], *expected_size)
    assert difference(frame, truth) < 12
    assert difference(np.rot90(frame, 2), truth) > 3 * difference(frame, truth) + 10  # not upside down
    assert info.rotation == degrees


def test_an_anamorphic_clip_keeps_its_display_width(clips):
    info, frame = first_preview(clips["sar"])
    assert (frame.shape[1], frame.shape[0]) == (436, 240)  # 720x576 at SAR 16:11 shows as 1047x576
    assert (info.display_width, info.display_height) == (1047, 576)
    assert difference(frame, ffmpeg_frame(clips["sar"], 436, 240)) < 12


def test_model_frames_are_turned_too(clips):
    info, windows = decode_windows(clips["rotate90"], sampling_fps=4.0, **SIZING)
    frames = windows[0].frames
    assert frames.shape[1] > frames.shape[2]  # portrait, as shown
    _, plain = decode_windows(clips["base"], sampling_fps=4.0, **SIZING)
    assert plain[0].frames.shape[2] > plain[0].frames.shape[1]


def test_display_matrices_map_to_ffmpegs_transforms():
    one = 1 << 16
    assert orientation_from_matrix(None).transform == ""
    assert orientation_from_matrix([one, 0, 0, 0, one, 0, 0, 0, 1 << 30]).transform == ""
    assert orientation_from_matrix([one, 0, 0, 0, -one, 0, 0, 0, 1 << 30]).transform == "vflip"
    assert orientation_from_matrix([-one, 0, 0, 0, -one, 0, 0, 0, 1 << 30]).transform == "hflip+vflip"
    assert orientation_from_matrix([-one, 0, 0, 0, one, 0, 0, 0, 1 << 30]).transform == "hflip"
