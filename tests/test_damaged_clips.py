"""The damage matrix of issue 28: clips with bytes overwritten at several places, or cut short, decode
the same way every time and whatever the thread count, every window has its frames, and the windows
are the reference windows of the decoded frame count (no frame range that decodes is left without a
window). And the 238-of-300 clip: 300 packets demuxed, 238 frames decodable, windows of 238 frames and
``VideoInfo.lost_frames == 62``.

A ``DecodeError`` is acceptable only where every run raises the same message and FFmpeg itself decodes
less than half of the clip's frames (``MAY_RAISE`` documents such variants; none of these clips is one:
their frames mostly decode).
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np
import pytest
from clips import read_frame_index
from ffmpeg_clips import encode_synthetic, encoder_available, ffmpeg_frame_count, overwrite_runs, truncate_copy

from beam_captions.inference.frame_bounds import FrameBounds
from beam_captions.media.decode import DecodeError, PreviewSpec, decode_windows
from beam_captions.media.windowing import MIN_FRAMES, compute_windows

FRAMES, FPS, WIDTH, HEIGHT = 250, 25, 176, 144
SETTINGS = {"frame_size": FrameBounds(24 * 16, 64 * 48).frame_size, "preview": PreviewSpec(1.0, 32),
            "sampling_fps": 2.0}
WINDOWINGS = {"256/128": (256, 128), "64/16": (64, 16), "128/32": (128, 32)}

SOURCES = {  # name -> (encoder, suffix, ffmpeg output options)
    "h264 mp4": ("libx264", ".mp4", ("-c:v", "libx264", "-preset", "superfast", "-crf", "18", "-bf", "3",
                                     "-pix_fmt", "yuv420p", "-movflags", "+faststart")),  # the index in front
    "hevc mkv": ("libx265", ".mkv", ("-c:v", "libx265", "-preset", "ultrafast", "-crf", "18",
                                     "-x265-params", "bframes=3:log-level=error", "-pix_fmt", "yuv420p")),
    "xvid avi packed B-frames": ("libxvid", ".avi", ("-c:v", "libxvid", "-bf", "2", "-q:v", "3",
                                                      "-pix_fmt", "yuv420p")),
    "mpeg4 avi unpacked B-frames": ("mpeg4", ".avi", ("-c:v", "mpeg4", "-vtag", "xvid", "-bf", "2", "-q:v", "3",
                                                      "-pix_fmt", "yuv420p")),
}
DAMAGES = ("overwritten", "truncated")
VARIANTS = [f"{source}, {damage}" for source in SOURCES for damage in DAMAGES]
MAY_RAISE: dict[str, str] = {}  # variant -> why a DecodeError is the right outcome (none so far)


def packet_span(path: str) -> tuple[int, int]:
    """Where the video packets lie in the file: the first one's offset and the end of the last one."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        spans = [(p.pos, p.pos + p.size) for p in container.demux(stream) if p.size and p.pos is not None
                 and p.pos >= 0]
    return min(s for s, _ in spans), max(e for _, e in spans)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Each variant's clip, made once per session."""
    root = tmp_path_factory.mktemp("damaged")
    cache: dict[str, str] = {}

    def make(variant: str) -> str:
        source, damage = variant.split(", ")
        encoder, suffix, args = SOURCES[source]
        if not encoder_available(encoder):
            pytest.skip(f"ffmpeg has no {encoder} encoder: variant {variant!r} not run")
        if variant not in cache:
            stem = source.replace(" ", "_")
            pristine = root / (stem + suffix)
            if not pristine.exists():
                encode_synthetic(pristine, args, num_frames=FRAMES, fps=FPS, width=WIDTH, height=HEIGHT)
            target = root / f"{stem}_{damage}{suffix}"
            if damage == "truncated":
                truncate_copy(pristine, target, 0.70)
            else:  # after the header, before a trailing index (AVI's idx1)
                first, end = packet_span(str(pristine))
                overwrite_runs(pristine, target, (0.30, 0.55, 0.80), 300, first_byte=first, end_byte=end)
            cache[variant] = str(target)
        return cache[variant]

    return make


def outcome(clip: str, **options):
    try:
        return decode_windows(clip, **SETTINGS, **options)
    except DecodeError as exc:
        return exc


def summary(result) -> str:
    """An outcome in one line: the error, or the frame count and window spans."""
    if isinstance(result, DecodeError):
        return f"DecodeError({result})"
    info, windows = result
    return f"{info.num_frames} frames, windows {[(d.window.start, d.window.end) for d in windows]}"


def shown(frames: np.ndarray) -> list:
    """The index each synthetic frame shows (``?`` where damage made it unreadable)."""
    def read(frame):
        try:
            return read_frame_index(frame, tolerance=8.0)
        except ValueError:
            return "?"
    return [read(frame) for frame in frames]


def assert_same_outcome(got, want, what: str) -> None:
    if isinstance(want, DecodeError) or isinstance(got, DecodeError):
        assert summary(got) == summary(want), what
        return
    assert summary(got) == summary(want), what
    (info, windows), (want_info, want_windows) = got, want
    # the warnings may tell how it went (which pass, from which window): the clip's facts must agree
    assert dataclasses.replace(info, warnings=()) == dataclasses.replace(want_info, warnings=()), what
    assert [(d.window, d.frame_indices) for d in windows] == [(d.window, d.frame_indices) for d in want_windows], what
    for a, b in zip(windows, want_windows):
        assert np.array_equal(a.frames, b.frames), (
            f"{what}: model frames differ in {a.window}: they show {shown(a.frames)} vs {shown(b.frames)}")
        assert np.array_equal(a.preview_frames, b.preview_frames), f"{what}: previews differ in {a.window}"


@pytest.mark.parametrize("windowing", list(WINDOWINGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_damaged_clip_decodes_the_same_way_into_reference_windows(damaged, variant, windowing):
    clip = damaged(variant)
    window_size, remainder_threshold = WINDOWINGS[windowing]
    options = {"window_size": window_size, "remainder_threshold": remainder_threshold}
    first = outcome(clip, **options)
    assert_same_outcome(outcome(clip, **options), first, "a second run")
    assert_same_outcome(outcome(clip, **options, decode_threads=1), first, "1 decoder thread")
    assert_same_outcome(outcome(clip, **options, decode_threads=4), first, "4 decoder threads")
    if isinstance(first, DecodeError):
        reference = ffmpeg_frame_count(clip)
        assert variant in MAY_RAISE, f"raised although FFmpeg decodes {reference} of {FRAMES} frames: {first}"
        return
    info, windows = first
    assert [d.window for d in windows] == compute_windows(info.num_frames, window_size, remainder_threshold)
    for decoded in windows:
        assert decoded.frames.shape[0] == len(decoded.frame_indices) > 0
        assert all(decoded.window.start <= i <= decoded.window.end for i in decoded.frame_indices)


@pytest.mark.parametrize("windowing", list(WINDOWINGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_damaged_clip_decodes_as_on_the_plain_path(damaged, variant, windowing):
    """The decoder's shortcuts (skipping unkept frames, threads) give what the plain path gives: skipping
    must not count frames that would not have decoded, nor lose any."""
    clip = damaged(variant)
    window_size, remainder_threshold = WINDOWINGS[windowing]
    options = {"window_size": window_size, "remainder_threshold": remainder_threshold}
    plain = outcome(clip, **options, skip_unkept_frames=False, decode_threads=1)
    assert_same_outcome(outcome(clip, **options), plain, "default options vs the plain path")


def test_damaged_variants_are_damaged(damaged, tmp_path_factory):
    """Each variant lost frames against its pristine clip (FFmpeg's own count) and still has some."""
    for variant in VARIANTS:
        clip = damaged(variant)
        source, _ = variant.split(", ")
        pristine = os.path.join(os.path.dirname(clip), source.replace(" ", "_") + SOURCES[source][1])
        with av.open(clip) as container:
            packets = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
        reference, whole = ffmpeg_frame_count(clip), ffmpeg_frame_count(pristine)
        print(f"{variant}: {os.path.getsize(clip)} bytes, {packets} packets, FFmpeg decodes {reference} frames "
              f"(pristine: {whole})")
        assert MIN_FRAMES <= reference < whole, variant


LOST_AT, LOST_TOTAL = 238, 300


@pytest.fixture(scope="module")
def clip_238_of_300(tmp_path_factory) -> str:
    """A 300-frame H.264 MP4 (no B-frames: packet i is frame i) whose packets 238..299 hold only zero
    bytes: 300 packets demux, 238 frames decode (zero-length NALs make no frame)."""
    if not encoder_available("libx264"):
        pytest.skip("ffmpeg has no libx264 encoder: the 238-of-300 clip not made")
    root = tmp_path_factory.mktemp("lost")
    pristine = encode_synthetic(root / "300.mp4", ("-c:v", "libx264", "-preset", "superfast", "-crf", "23",
                                                   "-bf", "0", "-pix_fmt", "yuv420p"),
                                num_frames=LOST_TOTAL, fps=FPS, width=WIDTH, height=HEIGHT)
    with av.open(str(pristine)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    assert len(packets) == LOST_TOTAL
    data = bytearray(pristine.read_bytes())
    for pos, size in packets[LOST_AT:]:
        data[pos:pos + size] = bytes(size)
    target = root / "238_of_300.mp4"
    target.write_bytes(bytes(data))
    assert ffmpeg_frame_count(target) == LOST_AT
    return str(target)


@pytest.mark.parametrize("windowing", ["128/32", "64/16"])
def test_238_of_300_frames_get_every_window(clip_238_of_300, windowing):
    window_size, remainder_threshold = WINDOWINGS[windowing]
    info, windows = decode_windows(clip_238_of_300, window_size=window_size, remainder_threshold=remainder_threshold,
                                   **SETTINGS)
    assert info.num_frames == LOST_AT
    assert [d.window for d in windows] == compute_windows(LOST_AT, window_size, remainder_threshold)
    for decoded in windows:
        assert decoded.frames.shape[0] == len(decoded.frame_indices) > 0


def test_238_of_300_frames_says_frames_were_lost(clip_238_of_300):
    """``VideoInfo.lost_frames``: packets demuxed minus frames decoded."""
    info, _ = decode_windows(clip_238_of_300, window_size=128, remainder_threshold=32, **SETTINGS)
    assert info.lost_frames == LOST_TOTAL - LOST_AT


def test_238_of_300_frames_says_which_frames_were_lost(clip_238_of_300):
    info, _ = decode_windows(clip_238_of_300, window_size=64, remainder_threshold=16, **SETTINGS)
    assert info.lost_frame_ranges == ((LOST_AT, LOST_TOTAL - 1),)
    assert dict(info.warnings)["lost_frames"] == "62 of 300 frames could not be decoded (source frames 238-299)"


def test_a_clip_missing_a_window_fails_instead_of_being_whole(clip_238_of_300, monkeypatch):
    """The guard behind ``done``: a decode that did not produce every reference window raises (a failure
    record), here with the last window dropped on purpose."""
    from beam_captions.media import decode

    ready, rest = decode._WindowBuffers.ready, decode._WindowBuffers.rest

    def not_the_last(windows):
        return [window for window in windows if window.window.end != LOST_AT - 1]

    monkeypatch.setattr(decode._WindowBuffers, "ready", lambda self, count: not_the_last(ready(self, count)))
    monkeypatch.setattr(decode._WindowBuffers, "rest", lambda self: not_the_last(rest(self)))
    with pytest.raises(DecodeError, match=r"windows \[\(192, 237\)\] of the decoded frames were not produced"):
        decode_windows(clip_238_of_300, window_size=64, remainder_threshold=16, **SETTINGS)


def test_238_of_300_frames_in_a_run_is_done_with_every_window_and_says_what_was_lost(clip_238_of_300, tmp_path):
    import json

    from beam_captions.cli import run_job
    from beam_captions.records import clip_id_for

    out = str(tmp_path / "out")
    run_job(["--input", clip_238_of_300, "--output", out, "--generate-previews", "--captioning-window-size", "64",
             "--captioning-remainder-threshold", "16", "--preview-target-height", "32", "--no-gallery"])
    with open(os.path.join(out, "metas", f"{clip_id_for(clip_238_of_300)}.json")) as handle:
        meta = json.load(handle)
    assert meta["status"] == "done" and meta["num_frames"] == LOST_AT
    assert [(w["start_frame"], w["end_frame"]) for w in meta["windows"]] == [
        (w.start, w.end) for w in compute_windows(LOST_AT, 64, 16)]
    assert (meta["lost_frames"], meta["lost_frame_ranges"]) == (62, [[LOST_AT, LOST_TOTAL - 1]])
