"""P1: CPU cost of our decode pass plus previews, relative to a plain full decode by the ffmpeg CLI.

Ours: ``prepare_clip`` (the decode pass: model frames at the default pixel bound and 1 fps 240p
preview frames) and ``preview_window`` (``encode_webp``, quality 50, compression level 6) on each
window, in this process, counted with ``getrusage(RUSAGE_SELF)`` (all threads). Baseline:
``ffmpeg -i CLIP -f null -`` (decodes every frame, and the audio, and throws them away), counted
with ``getrusage(RUSAGE_CHILDREN)``.
"""

from __future__ import annotations

import statistics
import subprocess
from dataclasses import dataclass
from typing import Optional

import av

from beam_captions.media.decode import PreviewSpec
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms.prepare import PrepareConfig, prepare_clip
from beam_captions.transforms.previews import preview_window

from common import Figure, children_cpu, ffmpeg_version, find_ffmpeg, interleaved, median_ratio, self_cpu

# The pipeline's defaults: window 256, 2 fps model frames at the default (Qwen2.5-VL) pixel bound,
# 1 fps 240p previews, WebP quality 50 at compression level 6.
CONFIG = PrepareConfig(window_size=256, remainder_threshold=128, sampling_fps=2.0, preview=PreviewSpec(1.0, 240))
WEBP_OPTIONS = {"quality": 50, "compression_level": 6, "threads": 4}


@dataclass
class OursCost:
    """CPU seconds of one run of our prepare + previews, split by step, and what it made."""

    decode_s: float
    webp_s: float
    spans: list[tuple[float, float]]  # (start_s, duration_s) of each window
    preview_bytes: int

    @property
    def total_s(self) -> float:
        return self.decode_s + self.webp_s


def ours_cpu(clip: str) -> OursCost:
    """CPU seconds of ``prepare_clip`` then ``preview_window`` on every window, as the job chains them."""
    webp_s, spans, size = 0.0, [], 0
    start = self_cpu()
    for element in prepare_clip(ClipRef.from_source(clip), CONFIG):
        if isinstance(element, WindowRecord):
            before = self_cpu()
            (done,) = [r for r in preview_window(element, **WEBP_OPTIONS) if isinstance(r, WindowRecord)]
            webp_s += self_cpu() - before
            if done.preview_webp is None:
                raise RuntimeError(f"no preview for window {element.window_index} of {clip}")
            spans.append((element.start_s, element.end_s - element.start_s))
            size += len(done.preview_webp)
    total = self_cpu() - start
    return OursCost(total - webp_s, webp_s, spans, size)


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
    command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", clip, "-f", "null", "-"]
    subprocess.run(command, check=True)
    return children_cpu() - start


def run(clip: str, repeats: int, long_clip: Optional[str] = None) -> Figure:
    """The figure on ``clip``; ``long_clip`` adds one pair (ours, ffmpeg) on a long clip to the details."""
    figure = Figure("P1", "decode+previews CPU / ffmpeg full decode CPU", "CPU s", ("<=", 1.0))
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

    ffmpeg_decode_cpu(ffmpeg, clip)  # warm the page cache
    mine, theirs = interleaved(repeats, ours, lambda: ffmpeg_decode_cpu(ffmpeg, clip))
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(theirs)
    figure.ratio = median_ratio(mine, theirs)
    figure.details = {
        "clip": clip,
        "repeats": repeats,
        "ffmpeg": ffmpeg_version(ffmpeg),
        "windows": len(costs[0].spans),
        "preview_bytes": costs[0].preview_bytes,
        "ours_decode_cpu_s": statistics.median(c.decode_s for c in costs),
        "ours_webp_cpu_s": statistics.median(c.webp_s for c in costs),
        "pyav_decode_only_cpu_s": statistics.median(decode_only),
        "ours_cpu_s": mine,
        "ffmpeg_cpu_s": theirs,
    }
    if long_clip:
        long_ours = ours_cpu(long_clip)
        long_ffmpeg = ffmpeg_decode_cpu(ffmpeg, long_clip)
        figure.details["long_clip"] = {
            "clip": long_clip,
            "windows": len(long_ours.spans),
            "ours_cpu_s": long_ours.total_s,
            "ours_decode_cpu_s": long_ours.decode_s,
            "ours_webp_cpu_s": long_ours.webp_s,
            "ffmpeg_cpu_s": long_ffmpeg,
            "ratio": long_ours.total_s / long_ffmpeg,
        }
    return figure
