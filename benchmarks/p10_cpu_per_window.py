"""P10: CPU seconds per captioned window, next to the decode floor and to FFmpeg's own previews command.

Clips: ``SYNTHETIC_CLIPS`` (720p, 1080p and 4K H.264, 1080p HEVC; 30 fps lavfi sources made once with the
ffmpeg CLI). Settings: the reference's (window 256, 2 fps model frames at the default Qwen2.5-VL bound)
and the job's preview defaults (1 fps, 240p, WebP quality 50, compression level 6).

Per clip, interleaved, counted with ``getrusage`` (``RUSAGE_SELF`` for ours, all threads;
``RUSAGE_CHILDREN`` for the ffmpeg CLI):

- **caption path**: ``prepare_clip`` with model frames and no previews (probe pass + decode pass);
- **with previews**: ``prepare_clip`` with previews, then ``preview_window`` on each window (as P1);
- **decode floor**: ``ffmpeg -threads 1 -i CLIP -f null -`` (one thread: the least CPU FFmpeg decodes with);
- **FFmpeg previews**: one ``ffmpeg -threads 1`` command that decodes the clip once and writes every
  window's WebP from the same source frames ours picks (``select`` on the frame numbers, AREA scaling to
  the same size, ``libwebp`` at the same quality and level, one frame a second, looping).

Two rows: P10a = worst clip's caption path / decode floor (target <= 1.15); P10b = worst clip's with
previews / FFmpeg previews (target <= 1.0). ``details["clips"]`` has every clip's CPU s per window.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile

from beam_captions.media.decode import PreviewSpec, preview_size
from beam_captions.media.windowing import FrameWindow, preview_frame_indices
from beam_captions.records import ClipInfo, ClipRef, WindowRecord
from beam_captions.transforms.prepare import PrepareConfig, prepare_clip
from beam_captions.transforms.previews import preview_window

from common import (
    SYNTHETIC_CLIPS,
    Figure,
    children_cpu,
    ffmpeg_version,
    find_ffmpeg,
    median_ratio,
    self_cpu,
    synthetic_clip,
)

PREVIEW = PreviewSpec(1.0, 240)
# One decoder thread per clip (``--decode-threads 1``): the least CPU per window, as on GPU workers where
# many processes decode at once; the local default (0, FFmpeg's threads) costs 4-12 % more CPU.
CAPTIONS = PrepareConfig(window_size=256, remainder_threshold=128, sampling_fps=2.0, decode_threads=1)
WITH_PREVIEWS = PrepareConfig(window_size=256, remainder_threshold=128, sampling_fps=2.0, preview=PREVIEW,
                              decode_threads=1)
WEBP_OPTIONS = {"quality": 50, "compression_level": 6, "threads": 4}
QUIET = ["-nostdin", "-y", "-hide_banner", "-loglevel", "error"]


def caption_path_cpu(clip: str) -> tuple[float, int]:
    """CPU seconds of ``prepare_clip`` with model frames only, and the windows it gave."""
    start, windows = self_cpu(), 0
    for element in prepare_clip(ClipRef.from_source(clip), CAPTIONS):
        windows += isinstance(element, WindowRecord)
    return self_cpu() - start, windows


def with_previews_cpu(clip: str) -> tuple[float, int]:
    """CPU seconds of ``prepare_clip`` with previews then ``preview_window`` on each window, and the
    preview bytes."""
    start, size = self_cpu(), 0
    for element in prepare_clip(ClipRef.from_source(clip), WITH_PREVIEWS):
        if isinstance(element, WindowRecord):
            (done,) = [r for r in preview_window(element, **WEBP_OPTIONS) if isinstance(r, WindowRecord)]
            if done.preview_webp is None:
                raise RuntimeError(f"no preview for window {element.window_index} of {clip}")
            size += len(done.preview_webp)
    return self_cpu() - start, size


def decode_floor_cpu(ffmpeg: str, clip: str) -> float:
    """CPU seconds of ``ffmpeg -threads 1 -i CLIP -f null -``."""
    start = children_cpu()
    subprocess.run([ffmpeg, *QUIET, "-threads", "1", "-i", clip, "-f", "null", "-"], check=True)
    return children_cpu() - start


def ffmpeg_previews_command(ffmpeg: str, clip: str, out_dir: str) -> list[str]:
    """FFmpeg's one command for the clip's previews: the frames ours picks, scaled as ours, one WebP a window."""
    windows, info = [], None
    for element in prepare_clip(ClipRef.from_source(clip), PrepareConfig(preview=PREVIEW, model_frames=False)):
        if isinstance(element, WindowRecord):
            windows.append(FrameWindow(element.window_index, element.start_frame, element.end_frame))
        elif isinstance(element, ClipInfo):
            info = element
    if info is None:
        raise RuntimeError(f"{clip}: no ClipInfo")
    width, height = preview_size(info.display_width, info.display_height, PREVIEW.target_height)
    branches = [f"[0:v]split={len(windows)}" + "".join(f"[s{i}]" for i in range(len(windows)))]
    outputs: list[str] = []
    for i, window in enumerate(windows):
        picks = "+".join(f"eq(n\\,{n})" for n in preview_frame_indices(window, info.fps, PREVIEW.target_fps))
        branches.append(f"[s{i}]select='{picks}',scale={width}:{height}:flags=area,settb=1,setpts=N[w{i}]")
        outputs += ["-map", f"[w{i}]", "-c:v", "libwebp", "-lossless", "0", "-compression_level", "6",
                    "-q:v", "50", "-loop", "0", "-fps_mode", "passthrough", os.path.join(out_dir, f"w{i}.webp")]
    return [ffmpeg, *QUIET, "-threads", "1", "-i", clip, "-filter_complex", ";".join(branches), *outputs]


def ffmpeg_previews_cpu(command: list[str], out_dir: str) -> tuple[float, int]:
    """CPU seconds of FFmpeg's previews command, and the bytes it wrote."""
    start = children_cpu()
    subprocess.run(command, check=True)
    spent = children_cpu() - start
    return spent, sum(os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir))


def measure_clip(ffmpeg: str, name: str, repeats: int) -> dict:
    clip = synthetic_clip(name)
    decode_floor_cpu(ffmpeg, clip)  # warm the page cache
    _, windows = caption_path_cpu(clip)
    runs: dict[str, list[float]] = {"captions": [], "previews": [], "floor": [], "ffmpeg_previews": []}
    sizes = {"ours": 0, "ffmpeg": 0}
    with tempfile.TemporaryDirectory(prefix="p10-") as out_dir:
        command = ffmpeg_previews_command(ffmpeg, clip, out_dir)

        def captions() -> None:
            runs["captions"].append(caption_path_cpu(clip)[0])

        def previews() -> None:
            spent, sizes["ours"] = with_previews_cpu(clip)
            runs["previews"].append(spent)

        def floor() -> None:
            runs["floor"].append(decode_floor_cpu(ffmpeg, clip))

        def theirs() -> None:
            spent, sizes["ffmpeg"] = ffmpeg_previews_cpu(command, out_dir)
            runs["ffmpeg_previews"].append(spent)

        order = [captions, floor, previews, theirs]
        for repeat in range(repeats):  # interleaved; which one goes first rotates
            shift = repeat % len(order)
            for step in order[shift:] + order[:shift]:
                step()
    medians = {key: statistics.median(values) for key, values in runs.items()}
    return {
        "clip": clip,
        "windows": windows,
        "cpu_s": runs,
        "cpu_s_per_window": {key: value / windows for key, value in medians.items()},
        "captions_over_floor": median_ratio(runs["captions"], runs["floor"]),
        "previews_over_ffmpeg": median_ratio(runs["previews"], runs["ffmpeg_previews"]),
        "preview_bytes": sizes,
    }


def run(repeats: int, clips: tuple[str, ...] = tuple(SYNTHETIC_CLIPS)) -> list[Figure]:
    captions = Figure("P10a", "caption path CPU / decode floor (ffmpeg -threads 1), worst clip", "CPU s/window",
                      ("<=", 1.15))
    previews = Figure("P10b", "with previews CPU / ffmpeg one-command previews, worst clip", "CPU s/window",
                      ("<=", 1.0))
    ffmpeg = find_ffmpeg()
    if not ffmpeg:
        captions.skipped = previews.skipped = "skipped: no ffmpeg CLI (apt-get install -y ffmpeg)"
        return [captions, previews]
    results = {name: measure_clip(ffmpeg, name, repeats) for name in clips}
    for figure, ratio_key, ours_key, base_key in (
        (captions, "captions_over_floor", "captions", "floor"),
        (previews, "previews_over_ffmpeg", "previews", "ffmpeg_previews"),
    ):
        worst = max(results, key=lambda name: results[name][ratio_key])
        figure.ratio = results[worst][ratio_key]
        figure.ours = results[worst]["cpu_s_per_window"][ours_key]
        figure.baseline = results[worst]["cpu_s_per_window"][base_key]
        figure.details = {"worst_clip": worst, "repeats": repeats, "ffmpeg": ffmpeg_version(ffmpeg),
                          "clips": results if figure is captions else {}}
    previews.details["clips"] = "see P10a"
    return [captions, previews]


def format_clips(figure: Figure) -> str:
    """Per-clip CPU s per window (the P10 table)."""
    clips = figure.details.get("clips")
    if not isinstance(clips, dict) or not clips:
        return ""
    lines = ["| clip | windows | caption path | decode floor | ratio | with previews | FFmpeg previews | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in clips.items():
        w = r["cpu_s_per_window"]
        lines.append(f"| {name} | {r['windows']} | {w['captions']:.2f} | {w['floor']:.2f} | "
                     f"{r['captions_over_floor']:.2f} | {w['previews']:.2f} | {w['ffmpeg_previews']:.2f} | "
                     f"{r['previews_over_ffmpeg']:.2f} |")
    return "\nP10 CPU s per captioned window:\n" + "\n".join(lines)
