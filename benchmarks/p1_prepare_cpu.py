"""P1: CPU cost of our decode pass plus previews on the trailer, relative to FFmpeg making the same previews.

Ours: ``prepare_clip`` (the decode pass: model frames at the default pixel bound and 1 fps 240p
preview frames) and ``preview_window`` (``encode_webp``, quality 50, compression level 6) on each
window, in this process, counted with ``getrusage(RUSAGE_SELF)`` (all threads), at the job's defaults but
one decoder thread (``--decode-threads 1``, as the baseline's ``-threads 1``; ``details`` has ours at the
default automatic threads too).
Baseline (issue 22): FFmpeg's one command that decodes the clip once and writes every window's WebP from
the same source frames (P10b's command: ``-threads 1``, ``select`` on the frames ours picks, AREA scaling,
``libwebp`` q50 level 6), counted with ``getrusage(RUSAGE_CHILDREN)``. It makes no model frames, so the
ratio carries them. ``details`` also has ours against a plain ``ffmpeg -i CLIP -f null -`` (the older
baseline: decodes every frame and the audio, encodes nothing).
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import av

from beam_captions.media.decode import PreviewSpec
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms.prepare import PrepareConfig, prepare_clip
from beam_captions.transforms.previews import preview_window

from common import Figure, children_cpu, ffmpeg_version, find_ffmpeg, interleaved, median_ratio, self_cpu
from p10_cpu_per_window import ffmpeg_previews_command, ffmpeg_previews_cpu

# The pipeline's defaults: window 256, 2 fps model frames at the default (Qwen2.5-VL) pixel bound,
# 1 fps 240p previews, WebP quality 50 at compression level 6; one decoder thread as FFmpeg's -threads 1.
AUTO_THREADS = PrepareConfig(window_size=256, remainder_threshold=128, sampling_fps=2.0,
                             preview=PreviewSpec(1.0, 240))
CONFIG = dataclasses.replace(AUTO_THREADS, decode_threads=1)
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


def ours_cpu(clip: str, config: PrepareConfig = CONFIG) -> OursCost:
    """CPU seconds of ``prepare_clip`` then ``preview_window`` on every window, as the job chains them."""
    webp_s, spans, size = 0.0, [], 0
    start = self_cpu()
    for element in prepare_clip(ClipRef.from_source(clip), config):
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
    """The figure on ``clip``; ``long_clip`` adds one pair (ours, ffmpeg null decode) on a long clip to the
    details."""
    figure = Figure("P1", "decode+previews CPU / ffmpeg same-previews CPU", "CPU s", ("<=", 1.0))
    ffmpeg = find_ffmpeg()
    if not ffmpeg:
        figure.skipped = "skipped: no ffmpeg CLI (apt-get install -y ffmpeg)"
        return figure
    costs: list[OursCost] = []
    decode_only: list[float] = []
    auto_threads: list[float] = []
    null_decode: list[float] = []
    ffmpeg_bytes: list[int] = []

    with tempfile.TemporaryDirectory(prefix="p1-") as out_dir:
        command = ffmpeg_previews_command(ffmpeg, clip, out_dir)

        def ours() -> float:
            costs.append(ours_cpu(clip))
            decode_only.append(pyav_decode_only_cpu(clip))  # explains the ratio; not part of it
            auto_threads.append(ours_cpu(clip, AUTO_THREADS).total_s)  # the job's default; not part of it
            return costs[-1].total_s

        def theirs() -> float:
            null_decode.append(ffmpeg_decode_cpu(ffmpeg, clip))  # the older baseline; not part of the ratio
            spent, size = ffmpeg_previews_cpu(command, out_dir)
            ffmpeg_bytes.append(size)
            return spent

        ffmpeg_decode_cpu(ffmpeg, clip)  # warm the page cache
        mine, previews = interleaved(repeats, ours, theirs)
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(previews)
    figure.ratio = median_ratio(mine, previews)
    figure.details = {
        "clip": clip,
        "repeats": repeats,
        "ffmpeg": ffmpeg_version(ffmpeg),
        "windows": len(costs[0].spans),
        "preview_bytes": costs[0].preview_bytes,
        "ffmpeg_preview_bytes": ffmpeg_bytes[0],
        "ours_decode_cpu_s": statistics.median(c.decode_s for c in costs),
        "ours_webp_cpu_s": statistics.median(c.webp_s for c in costs),
        "pyav_decode_only_cpu_s": statistics.median(decode_only),
        "ours_cpu_s": mine,
        "ffmpeg_previews_cpu_s": previews,
        "ffmpeg_null_decode_cpu_s": null_decode,
        "ours_over_ffmpeg_null_decode": median_ratio(mine, null_decode),
        "ours_auto_threads_cpu_s": auto_threads,
        "ours_auto_threads_over_ffmpeg_previews": median_ratio(auto_threads, previews),
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
            "ffmpeg_null_decode_cpu_s": long_ffmpeg,
            "ratio_over_null_decode": long_ours.total_s / long_ffmpeg,
        }
    return figure
