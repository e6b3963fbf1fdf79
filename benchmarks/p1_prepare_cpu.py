"""P1: CPU cost of our decode pass plus previews, relative to a plain full decode by the ffmpeg CLI.

Ours: ``decode_windows`` (model frames at the default pixel bound and 1 fps 240p preview frames) and
``encode_webp`` of every window's preview (quality 50, compression level 6), in this process, counted
with ``getrusage(RUSAGE_SELF)`` (all threads). Baseline: ``ffmpeg -i CLIP -f null -`` (decodes every
frame, and the audio, and throws them away), counted with ``getrusage(RUSAGE_CHILDREN)``.
"""

from __future__ import annotations

import statistics
import subprocess
from dataclasses import dataclass

import av
from common import Figure, children_cpu, ffmpeg_version, find_ffmpeg, interleaved, median_ratio, self_cpu

from beam_captions.media.decode import DecodedWindow, PreviewSpec, VideoInfo, decode_windows
from beam_captions.media.webp import encode_webp

PREVIEW = PreviewSpec(target_fps=1.0, target_height=240)
WEBP_OPTIONS = {"quality": 50, "compression_level": 6, "threads": 4}


@dataclass
class OursCost:
    """CPU seconds of one run of our prepare + previews, split by step."""

    decode_s: float
    webp_s: float
    windows: int
    preview_bytes: int

    @property
    def total_s(self) -> float:
        return self.decode_s + self.webp_s


def decode_clip(clip: str) -> tuple[VideoInfo, list[DecodedWindow]]:
    """Our decode pass with the pipeline's defaults (window 256, 2 fps model frames, 1 fps 240p previews)."""
    return decode_windows(clip, window_size=256, remainder_threshold=128, sampling_fps=2.0, preview=PREVIEW)


def ours_cpu(clip: str) -> OursCost:
    """CPU seconds of decoding ``clip`` into windows and encoding a WebP preview per window."""
    start = self_cpu()
    _, windows = decode_clip(clip)
    decoded = self_cpu()
    sizes = [len(encode_webp(w.preview_frames, fps=PREVIEW.target_fps, **WEBP_OPTIONS)) for w in windows]
    return OursCost(decoded - start, self_cpu() - decoded, len(windows), sum(sizes))


def pyav_decode_only_cpu(clip: str) -> float:
    """CPU seconds of decoding every video frame with PyAV and converting none (where ours starts from)."""
    start = self_cpu()
    with av.open(clip) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            pass
    return self_cpu() - start


def ffmpeg_decode_cpu(ffmpeg: str, clip: str) -> float:
    """CPU seconds of ``ffmpeg -i CLIP -f null -``."""
    start = children_cpu()
    subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", clip, "-f", "null", "-"], check=True)
    return children_cpu() - start


def run(clip: str, repeats: int) -> Figure:
    figure = Figure("P1", "decode+previews CPU / ffmpeg full decode CPU", "CPU s", ("<=", 1.3))
    ffmpeg = find_ffmpeg()
    if not ffmpeg:
        figure.skipped = "skipped: no ffmpeg CLI (apt-get install -y ffmpeg)"
        return figure
    costs: list[OursCost] = []
    decode_only: list[float] = []

    def ours() -> float:
        costs.append(ours_cpu(clip))
        decode_only.append(pyav_decode_only_cpu(clip))  # explains the ratio; not part of it
        return costs[-1].total_s

    decode_clip(clip)  # warm the page cache and the libraries
    mine, theirs = interleaved(repeats, ours, lambda: ffmpeg_decode_cpu(ffmpeg, clip))
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(theirs)
    figure.ratio = median_ratio(mine, theirs)
    figure.details = {
        "clip": clip,
        "repeats": repeats,
        "ffmpeg": ffmpeg_version(ffmpeg),
        "windows": costs[0].windows,
        "preview_bytes": costs[0].preview_bytes,
        "ours_decode_cpu_s": statistics.median(c.decode_s for c in costs),
        "ours_webp_cpu_s": statistics.median(c.webp_s for c in costs),
        "pyav_decode_only_cpu_s": statistics.median(decode_only),
        "ours_cpu_s": mine,
        "ffmpeg_cpu_s": theirs,
    }
    return figure
