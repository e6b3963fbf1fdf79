"""The codec matrix of issue 28: clips that Debian's ``ffmpeg`` encodes with each codec and container
decode into the reference windows, with FFmpeg's own frame count, and the kept frames are those of a
full decode (each synthetic frame shows its index), with the decoder's default options (its shortcuts
on) and on the plain path (``skip_unkept_frames=False, decode_threads=1``).

A case whose encoder this ``ffmpeg`` lacks is skipped with a reason naming the encoder (``-ra`` shows
it) and counted by ``test_matrix_names_missing_encoders``, which prints and warns the missing ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from clips import read_frame_index
from ffmpeg_clips import encode_synthetic, encoder_available, ffmpeg_frame_count, ffmpeg_frame_indices

from beam_captions.inference.frame_bounds import FrameBounds
from beam_captions.media.decode import PreviewSpec, decode_windows
from beam_captions.media.windowing import compute_windows, sample_frame_indices

FRAMES, FPS, WIDTH, HEIGHT = 120, 25, 176, 144  # H.263 takes 176x144 (QCIF) or 352x288 only
SAMPLING_FPS = 2.0
# model frames of 96x78: bands of 32 pixels, wide enough for read_frame_index
SETTINGS = {"frame_size": FrameBounds(24 * 16, 96 * 80).frame_size, "preview": PreviewSpec(1.0, 32),
            "sampling_fps": SAMPLING_FPS}
WINDOWINGS = {"32/8": (32, 8), "256/128": (256, 128)}  # several windows; the default: one
PLAIN = {"skip_unkept_frames": False, "decode_threads": 1}


@dataclass(frozen=True)
class Case:
    encoder: str
    suffix: str
    args: tuple[str, ...]
    frames: int = FRAMES  # the frames the file holds (an encoder that drops some says so here)
    packed: bool | None = None  # MPEG-4 Part 2 in AVI: packed B-frames (DivX/Xvid "packed bitstream") or not
    width: int = WIDTH
    height: int = HEIGHT


X264_FAST = ("-preset", "superfast", "-crf", "10", "-pix_fmt", "yuv420p")  # ultrafast has no B-frames
X265 = ("-c:v", "libx265", "-preset", "ultrafast", "-crf", "10", "-pix_fmt", "yuv420p")
MPEG4_B = ("-bf", "2", "-q:v", "2", "-pix_fmt", "yuv420p")

CASES: dict[str, Case] = {
    "h264 B-frames mp4": Case("libx264", ".mp4", ("-c:v", "libx264", *X264_FAST, "-bf", "3")),
    "h264 no B-frames mp4": Case("libx264", ".mp4", ("-c:v", "libx264", *X264_FAST, "-bf", "0")),
    "h264 intra-only mp4": Case("libx264", ".mp4", ("-c:v", "libx264", *X264_FAST, "-x264-params", "keyint=1")),
    "h264 B-frames mkv": Case("libx264", ".mkv", ("-c:v", "libx264", *X264_FAST, "-bf", "3")),
    "hevc B-frames mp4": Case("libx265", ".mp4", (*X265, "-x265-params", "bframes=3:log-level=error",
                                                  "-tag:v", "hvc1")),
    "hevc B-frames mkv": Case("libx265", ".mkv", (*X265, "-x265-params", "bframes=3:log-level=error")),
    # FFmpeg's own MPEG-4 encoder never packs B-frames: one VOP a chunk
    "mpeg4 B-frames xvid-tag avi unpacked": Case("mpeg4", ".avi", ("-c:v", "mpeg4", "-vtag", "xvid", *MPEG4_B),
                                                 packed=False),
    # libxvid in AVI writes a packed bitstream (XVID_GLOBAL_PACKED: a B-VOP rides in its P-VOP's chunk, an
    # N-VOP stub follows), as old Xvid/DivX files; the wrapper does not flush its last frame
    "xvid B-frames avi packed": Case("libxvid", ".avi", ("-c:v", "libxvid", *MPEG4_B), frames=FRAMES - 1,
                                     packed=True),
    "xvid B-frames avi unpacked": Case("libxvid", ".avi", ("-c:v", "libxvid", *MPEG4_B,
                                                           "-bsf:v", "mpeg4_unpack_bframes"),
                                       frames=FRAMES - 1, packed=False),
    "mpeg2 ts": Case("mpeg2video", ".ts", ("-c:v", "mpeg2video", *MPEG4_B, "-f", "mpegts")),
    "mpeg2 ps mpg": Case("mpeg2video", ".mpg", ("-c:v", "mpeg2video", *MPEG4_B, "-f", "vob")),
    "mpeg2 mpeg1-system mpg": Case("mpeg2video", ".mpg", ("-c:v", "mpeg2video", *MPEG4_B, "-f", "mpeg")),
    "mpeg2 vob": Case("mpeg2video", ".vob", ("-c:v", "mpeg2video", *MPEG4_B, "-f", "vob")),
    "mpeg1 mpg": Case("mpeg1video", ".mpg", ("-c:v", "mpeg1video", *MPEG4_B, "-f", "mpeg")),
    "vp8 webm": Case("libvpx", ".webm", ("-c:v", "libvpx", "-b:v", "2M", "-crf", "4", "-qmin", "0", "-qmax", "10",
                                         "-cpu-used", "8", "-auto-alt-ref", "1", "-lag-in-frames", "16")),
    "vp9 webm": Case("libvpx-vp9", ".webm", ("-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "10", "-cpu-used", "8",
                                             "-row-mt", "0", "-auto-alt-ref", "1", "-lag-in-frames", "16")),
    "av1 libaom mkv": Case("libaom-av1", ".mkv", ("-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "10",
                                                  "-row-mt", "0", "-threads", "1")),
    "av1 libsvtav1 webm": Case("libsvtav1", ".webm", ("-c:v", "libsvtav1", "-preset", "12", "-crf", "10",
                                                      "-svtav1-params", "lp=1")),
    "av1 librav1e mkv": Case("librav1e", ".mkv", ("-c:v", "librav1e", "-speed", "10", "-qp", "20")),
    "theora ogv": Case("libtheora", ".ogv", ("-c:v", "libtheora", "-q:v", "10")),
    "mjpeg avi": Case("mjpeg", ".avi", ("-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj420p")),
    "prores mov": Case("prores_ks", ".mov", ("-c:v", "prores_ks", "-profile:v", "1")),
    # DNxHR takes any size from 256x120 up
    "dnxhr mov": Case("dnxhd", ".mov", ("-c:v", "dnxhd", "-profile:v", "dnxhr_lb", "-pix_fmt", "yuv422p"),
                      width=256),
    "ffv1 mkv": Case("ffv1", ".mkv", ("-c:v", "ffv1",)),
    "wmv2 wmv": Case("wmv2", ".wmv", ("-c:v", "wmv2", "-q:v", "2")),
    "flv1 flv": Case("flv", ".flv", ("-c:v", "flv", "-q:v", "2")),
    "h263 3gp": Case("h263", ".3gp", ("-c:v", "h263", "-q:v", "2")),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Each case's clip, encoded once per session."""
    root = tmp_path_factory.mktemp("codec-matrix")
    cache: dict[str, str] = {}

    def make(name: str) -> str:
        case = CASES[name]
        if not encoder_available(case.encoder):
            pytest.skip(f"ffmpeg has no {case.encoder} encoder: case {name!r} not run (counted as missing)")
        if name not in cache:
            path = root / (name.replace(" ", "_") + case.suffix)
            cache[name] = str(encode_synthetic(path, case.args, num_frames=FRAMES, fps=FPS, width=case.width,
                                               height=case.height))
        return cache[name]

    return make


def vops_per_packet(path: str) -> list[int]:
    """MPEG-4 Part 2 VOP start codes in each non-empty video packet."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return [bytes(p).count(b"\x00\x00\x01\xb6") for p in container.demux(stream) if p.size]


def assert_same(got, want) -> None:
    assert [d.window for d in got] == [d.window for d in want]
    for a, b in zip(got, want):
        assert a.frame_indices == b.frame_indices, a.window
        assert np.array_equal(a.frames, b.frames), f"model frames differ in {a.window}"
        assert np.array_equal(a.preview_frames, b.preview_frames), f"previews differ in {a.window}"


@pytest.mark.parametrize("windowing", list(WINDOWINGS))
@pytest.mark.parametrize("name", list(CASES))
def test_codec_decodes_to_the_reference_windows(made, name, windowing):
    case = CASES[name]
    clip = made(name)
    window_size, remainder_threshold = WINDOWINGS[windowing]
    reference = ffmpeg_frame_count(clip)
    assert reference == case.frames, f"ffprobe counts {reference} frames, {case.frames} expected"
    options = {**SETTINGS, "window_size": window_size, "remainder_threshold": remainder_threshold}
    info, windows = decode_windows(clip, **options)
    assert info.num_frames == reference, f"decoded {info.num_frames} frames, FFmpeg {reference}"
    assert abs(info.fps - FPS) < 0.01
    assert [d.window for d in windows] == compute_windows(reference, window_size, remainder_threshold)
    for decoded in windows:
        assert decoded.frame_indices == sample_frame_indices(decoded.window, FPS, SAMPLING_FPS)
        assert decoded.frames.shape[0] == len(decoded.frame_indices)
        assert [read_frame_index(frame) for frame in decoded.frames] == decoded.frame_indices, decoded.window
    plain_info, plain = decode_windows(clip, **options, **PLAIN)
    assert plain_info == info
    assert_same(windows, plain)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.packed is not None])
def test_mpeg4_avi_packing_is_what_the_case_says(made, name):
    """The packed case really holds packed B-frames (a chunk with two VOPs), the unpacked ones do not."""
    vops = vops_per_packet(made(name))
    assert (max(vops) >= 2) == CASES[name].packed, f"VOPs per packet: {sorted(set(vops))}"


def test_ffmpeg_reference_decode_shows_every_frame(made):
    """The reference itself: FFmpeg's decode of a B-frame clip shows frames 0..N-1 in order."""
    clip = made("h264 B-frames mp4")
    assert ffmpeg_frame_indices(clip, WIDTH, HEIGHT) == list(range(FRAMES))


def test_matrix_names_missing_encoders(capsys):
    """Every case is run or named here as missing: none is skipped in silence."""
    missing = sorted({case.encoder for case in CASES.values() if not encoder_available(case.encoder)})
    present = sorted({case.encoder for case in CASES.values() if encoder_available(case.encoder)})
    assert set(missing) | set(present) == {case.encoder for case in CASES.values()}
    skipped = [name for name, case in CASES.items() if case.encoder in missing]
    with capsys.disabled():
        print(f"\ncodec matrix: {len(CASES) - len(skipped)} of {len(CASES)} cases run; "
              f"missing encoders: {', '.join(missing) or 'none'}")
    if missing:
        warnings.warn(f"codec matrix: {len(skipped)} cases not run, ffmpeg lacks {', '.join(missing)}: "
                      f"{', '.join(skipped)}", stacklevel=1)
