"""P2: CPU cost of the reference's preview method for the same windows, relative to ours.

Reference, per window: re-encode the window's span to an H.264 mp4 with the ffmpeg CLI (libx264
defaults, no audio), then ``ffmpeg -i win.mp4 -vf fps=1,scale=-1:240 -c:v libwebp -lossless 0
-compression_level 6 -q:v 50 -loop 0 out.webp``; counted with ``getrusage(RUSAGE_CHILDREN)``.
Ours: the whole decode pass (model and preview frames) plus our WebP encoding (``p1_prepare_cpu``),
so ours also pays for the caption frames the reference decodes separately.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile

from common import Figure, children_cpu, ffmpeg_version, find_ffmpeg, interleaved, median_ratio
from p1_prepare_cpu import ours_cpu


QUIET = ["-nostdin", "-y", "-hide_banner", "-loglevel", "error"]


def reference_previews_cpu(ffmpeg: str, clip: str, spans: list[tuple[float, float]]) -> float:
    """CPU seconds of the reference's two ffmpeg calls per window."""
    start = children_cpu()
    with tempfile.TemporaryDirectory(prefix="p2-") as tmp:
        for index, (offset, duration) in enumerate(spans):
            window_mp4 = os.path.join(tmp, f"w{index}.mp4")
            subprocess.run(
                [ffmpeg, *QUIET, "-ss", f"{offset:.6f}", "-i", clip, "-t", f"{duration:.6f}",
                 "-an", "-c:v", "libx264", window_mp4],
                check=True,
            )
            subprocess.run(
                [ffmpeg, *QUIET, "-i", window_mp4, "-vf", "fps=1,scale=-1:240", "-c:v", "libwebp",
                 "-lossless", "0", "-compression_level", "6", "-q:v", "50", "-loop", "0",
                 os.path.join(tmp, f"w{index}.webp")],
                check=True,
            )
    return children_cpu() - start


def run(clip: str, repeats: int) -> Figure:
    figure = Figure("P2", "reference previews CPU / ours (decode pass + previews)", "CPU s", (">=", 3.0))
    ffmpeg = find_ffmpeg()
    if not ffmpeg:
        figure.skipped = "skipped: no ffmpeg CLI (apt-get install -y ffmpeg)"
        return figure
    spans = ours_cpu(clip).spans  # our windows; also warms the page cache
    mine, theirs = interleaved(
        repeats, lambda: ours_cpu(clip).total_s, lambda: reference_previews_cpu(ffmpeg, clip, spans)
    )
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(theirs)
    figure.ratio = median_ratio(theirs, mine)
    figure.details = {
        "clip": clip,
        "repeats": repeats,
        "windows": len(spans),
        "ffmpeg": ffmpeg_version(ffmpeg),
        "ours_cpu_s": mine,
        "reference_cpu_s": theirs,
    }
    return figure
