"""Clips made at test time with the system's ``ffmpeg`` command (Debian's, with every encoder), for the
codec and damage matrices (issue 28).

The frames are ``clips.synthetic_frame``s (each shows its own index as grey bands), piped to ``ffmpeg``
as raw RGB on its standard input; ``ffprobe`` counts the frames FFmpeg itself decodes, the reference
count. Every command is an argument list, never a shell line.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from clips import synthetic_frame

__all__ = [
    "FFMPEG",
    "FFPROBE",
    "encoder_available",
    "encoders",
    "encode_synthetic",
    "ffmpeg_frame_count",
    "ffmpeg_frame_indices",
    "overwrite_runs",
    "truncate_copy",
]

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"
_TIMEOUT_S = 120


@functools.lru_cache(maxsize=None)
def encoders() -> frozenset[str]:
    """Names of the encoders the ``ffmpeg`` command has (empty when there is no ``ffmpeg``)."""
    if not os.path.exists(FFMPEG):
        return frozenset()
    listing = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True,
                             timeout=_TIMEOUT_S, check=False).stdout
    names = set()
    started = False
    for line in listing.splitlines():
        if line.strip().startswith("------"):
            started = True  # the legend ends here
            continue
        parts = line.split()
        if started and len(parts) >= 2:
            names.add(parts[1])
    return frozenset(names)


def encoder_available(name: str) -> bool:
    """Whether ``ffmpeg -encoders`` lists the encoder ``name`` (e.g. ``libx264``, ``libxvid``)."""
    return name in encoders()


@functools.lru_cache(maxsize=8)
def _raw_frames(num_frames: int, width: int, height: int) -> bytes:
    return b"".join(synthetic_frame(i, width, height).tobytes() for i in range(num_frames))


def encode_synthetic(
    path: str | os.PathLike,
    output_args: Sequence[str],
    *,
    num_frames: int = 120,
    fps: int = 25,
    width: int = 176,
    height: int = 144,
) -> Path:
    """Encode ``num_frames`` synthetic frames at ``fps`` with ``ffmpeg``; ``output_args`` are the
    output options (codec, quality, ``-f`` format...) placed before ``path``. Raises
    ``RuntimeError`` with ffmpeg's message when it fails."""
    command = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
               "-an", *output_args, os.fspath(path)]
    done = subprocess.run(command, input=_raw_frames(num_frames, width, height), capture_output=True,
                          timeout=_TIMEOUT_S, check=False)
    if done.returncode != 0 or not os.path.exists(path) or os.path.getsize(path) == 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return Path(path)


def ffmpeg_frame_count(path: str | os.PathLike) -> int:
    """The frames FFmpeg decodes from the first video stream (``ffprobe -count_frames``): the reference."""
    done = subprocess.run(
        [FFPROBE, "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", os.fspath(path)],
        capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    text = done.stdout.strip().splitlines()
    try:
        return int(text[0].strip().rstrip(","))
    except (IndexError, ValueError):
        raise RuntimeError(f"ffprobe could not count the frames of {path}: {done.stdout!r} {done.stderr!r}") from None


def ffmpeg_frame_indices(path: str | os.PathLike, width: int, height: int) -> list[int]:
    """The index each frame of FFmpeg's own full decode shows (``clips.read_frame_index``), in output
    order, every frame passed through as decoded (``-fps_mode passthrough``)."""
    from clips import read_frame_index

    done = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", os.fspath(path), "-map", "0:v:0",
         "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "pipe:1"],
        capture_output=True, timeout=_TIMEOUT_S, check=False)
    frames = np.frombuffer(done.stdout, np.uint8)
    frames = frames[: len(frames) // (width * height * 3) * (width * height * 3)].reshape(-1, height, width, 3)
    return [read_frame_index(frame) for frame in frames]


def overwrite_runs(
    source: str | os.PathLike,
    target: str | os.PathLike,
    fractions: Sequence[float] = (0.30, 0.55, 0.80),
    run_bytes: int = 300,
    *,
    first_byte: int = 0,
    end_byte: int | None = None,
    seed: int = 28,
) -> Path:
    """Copy ``source`` to ``target`` with ``run_bytes`` random bytes written at each fraction of the file
    (each run kept within ``[first_byte, end_byte)``: after the header, before a trailing index)."""
    data = bytearray(Path(source).read_bytes())
    end = len(data) if end_byte is None else end_byte
    rng = np.random.default_rng(seed)
    for fraction in fractions:
        start = min(max(int(len(data) * fraction), first_byte), end - run_bytes)
        data[start:start + run_bytes] = rng.integers(0, 256, run_bytes, dtype=np.uint8).tobytes()
    Path(target).write_bytes(bytes(data))
    return Path(target)


def truncate_copy(source: str | os.PathLike, target: str | os.PathLike, fraction: float = 0.70) -> Path:
    """Copy the first ``fraction`` of ``source``'s bytes to ``target`` (a cut download)."""
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: int(len(data) * fraction)])
    return Path(target)
