"""The decoder skips the frames nobody keeps and no other frame refers to (issue 22): the kept frames are
the very frames of a full decode, on real H.264 clips with B-frames, a synthetic one, a variable-frame-rate
one and one with an undecodable packet, and fewer frames are decoded."""

from __future__ import annotations

import numpy as np
import pytest
from clips import corrupt_packet_5, make_clip
from test_bad_inputs import make_vfr_clip

from beam_captions.inference.frame_bounds import FrameBounds
from beam_captions.media import decode
from beam_captions.media.decode import PreviewSpec, decode_windows
from beam_captions.samples import sample_clip_paths

SETTINGS = {"frame_size": FrameBounds(24 * 16, 64 * 48).frame_size, "preview": PreviewSpec(1.0, 32),
            "window_size": 64, "remainder_threshold": 32, "sampling_fps": 2.0}


def clips(tmp_path) -> dict[str, str]:
    samples = sample_clip_paths()
    return {
        "bikes (real, B-frames)": samples["bikes.mp4"],
        "carphone (real, B-frames)": samples["carphone_pristine.mp4"],
        "synthetic x264": str(make_clip(tmp_path / "x264.mp4", 150, 24.0, 96, 64)),
        "variable frame rate": make_vfr_clip(str(tmp_path / "vfr.mp4"), num_frames=80),
        "an undecodable packet": str(make_clip(tmp_path / "bad.mp4", 90, 24.0, 96, 64, edit_packet=corrupt_packet_5)),
        "an undecodable intra-only packet": str(make_clip(tmp_path / "bad.avi", 90, 24.0, 64, 48, "mjpeg", "yuvj420p",
                                                          edit_packet=corrupt_packet_5)),
    }


@pytest.fixture
def frames_decoded(monkeypatch) -> list[int]:
    """How many frames each decode pass got from the decoder."""
    counts: list[int] = []
    original = decode._decoded_frames

    def counting(*args, **kwargs):
        counts.append(0)
        for frame in original(*args, **kwargs):
            counts[-1] += 1
            yield frame

    monkeypatch.setattr(decode, "_decoded_frames", counting)
    return counts


@pytest.mark.parametrize("name", ["bikes (real, B-frames)", "carphone (real, B-frames)", "synthetic x264",
                                  "variable frame rate", "an undecodable packet", "an undecodable intra-only packet"])
def test_the_kept_frames_are_those_of_a_full_decode(tmp_path, name, frames_decoded):
    clip = clips(tmp_path)[name]
    full_info, full = decode_windows(clip, skip_unkept_frames=False, **SETTINGS)
    full_count = sum(frames_decoded)
    info, windows = decode_windows(clip, **SETTINGS)
    assert info == full_info and len(windows) == len(full) > 0
    for got, want in zip(windows, full):
        assert got.window == want.window and got.frame_indices == want.frame_indices
        assert np.array_equal(got.frames, want.frames) and np.array_equal(got.preview_frames, want.preview_frames)
    if "B-frames" in name or name == "synthetic x264":
        assert sum(frames_decoded) - full_count < 0.8 * full_count, "the decoder skipped nothing"



def test_a_window_missing_a_kept_frame_is_an_error_not_uninitialised_memory(tmp_path, monkeypatch):
    """A pass that jumps over a frame a window keeps (here one such jump is injected) must not hand the
    window on with an unfilled slot: its frame arrays start uninitialised."""
    clip = str(make_clip(tmp_path / "x264.mp4", 150, 24.0, 96, 64))
    index_of = decode._FrameIndex.index_of

    def jumping(self, frame, count):
        index = index_of(self, frame, count)
        return index + 2 if index == 12 else index  # frame 13, sampled by window 0, is passed over

    monkeypatch.setattr(decode._FrameIndex, "index_of", jumping)
    with pytest.raises(decode.DecodeError, match="did not get all its frames"):
        decode_windows(clip, skip_unkept_frames=False, decode_threads=1, **SETTINGS)
