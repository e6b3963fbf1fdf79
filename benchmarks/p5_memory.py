"""P5: peak memory of a previews + captions job on a long clip over the same on a short clip.

Each job is ``python -m beam_captions ...`` (``run_job``) in a fresh subprocess. Its process tree
(the job process plus vLLM's engine-core and worker processes) is sampled from /proc every 0.2 s;
the figure is the peak of the summed RSS (shared library pages count once per process). Also
recorded: the job process's own peak. (``ru_maxrss`` is not used: a child starts with the peak of
the parent it was forked from, which here is a benchmark process holding vLLM.)
Each clip also gets a previews-only job (no vLLM), whose ratio shows the decode pass's growth
without vLLM's fixed ~2.5 GB around it. ``all_windows_arrays_mb`` is what all of a clip's windows
weigh as numpy arrays (model + preview frames), at the tiny model's frame bounds and at the
reference's Qwen2.5-VL bounds: what a decode that keeps a clip's windows all at once would hold.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import av
import psutil

from beam_captions.inference.frame_bounds import FrameBounds, model_frame_bounds, reference_bounds
from beam_captions.media.decode import preview_size
from beam_captions.media.windowing import compute_windows, num_preview_frames, num_sampled_frames

from captioning import job_flags
from common import REPO_DIR, Figure, clip_folder

MB = 2**20


def _tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS of ``root`` and its descendants, RSS of ``root``) in bytes."""
    own = total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        own = rss if process.pid == root.pid else own
    return total, own


def job_peak_memory(input_dir: str, model_dir: Optional[str], vllm_kwargs: dict[str, Any]) -> dict[str, float]:
    """Run one job in a subprocess and return its peak memory figures in MiB and its wall seconds.

    With ``model_dir`` None the job makes previews only, and frames are cut to the default (real
    Qwen2.5-VL) pixel bound instead of the tiny model's.
    """
    output = tempfile.mkdtemp(prefix="p5-job-")
    if model_dir:
        flags = job_flags(input_dir, output, model_dir, vllm_kwargs)
    else:
        flags = ["--input", input_dir, "--output", output, "--generate-previews"]
    command = [sys.executable, "-m", "beam_captions", *flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(process.pid)
    peak_tree = peak_own = 0
    try:
        while True:
            pid, status = os.waitpid(process.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree, own = _tree_rss(root)
            except psutil.Error:
                tree = own = 0
            peak_tree, peak_own = max(peak_tree, tree), max(peak_own, own)
            time.sleep(0.2)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"job failed with exit code {process.returncode}: {' '.join(command)}")
    return {
        "peak_tree_rss_mb": peak_tree / MB,
        "peak_job_process_rss_mb": peak_own / MB,
        "wall_s": time.perf_counter() - start,
    }


def all_windows_arrays_mb(clip: str, bounds: FrameBounds) -> float:
    """MiB of model + preview frames ``decode_windows`` holds for ``clip`` (defaults, 1 fps 240p previews)."""
    with av.open(clip) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        fps, width, height = float(stream.average_rate), stream.codec_context.width, stream.codec_context.height
    small_w, small_h = preview_size(width, height, 240)
    size = 0
    for window in compute_windows(total, 256, 128):
        sampled = num_sampled_frames(window.num_frames, fps, 2.0)
        model_w, model_h = bounds.frame_size(width, height, sampled)
        size += sampled * model_w * model_h * 3
        size += num_preview_frames(window.num_frames, fps, 1.0) * small_w * small_h * 3
    return size / MB


def run(long: str, short: str, model_dir: str, vllm_kwargs: dict[str, Any]) -> Figure:
    figure = Figure("P5", "peak RSS long clip / short clip (previews + captions job)", "MiB", ("<=", 1.2))
    runs: dict[str, dict[str, Any]] = {}
    for name, clip in (("short", short), ("long", long)):
        folder = clip_folder(f"p5-{name}", [clip])
        runs[name] = {
            "clip": clip,
            "captions_job": job_peak_memory(folder, model_dir, vllm_kwargs),
            "previews_only_job": job_peak_memory(folder, None, vllm_kwargs),
            "all_windows_arrays_mb": {
                "tiny_model_bound": all_windows_arrays_mb(clip, model_frame_bounds(model_dir, "qwen")),
                "qwen2.5_default_bound": all_windows_arrays_mb(clip, reference_bounds("qwen2.5")),
            },
        }
    long_run, short_run = runs["long"], runs["short"]
    figure.ours = long_run["captions_job"]["peak_tree_rss_mb"]
    figure.baseline = short_run["captions_job"]["peak_tree_rss_mb"]
    figure.ratio = figure.ours / figure.baseline
    figure.details = {
        **runs,
        "captions_job_process_ratio": (
            long_run["captions_job"]["peak_job_process_rss_mb"] / short_run["captions_job"]["peak_job_process_rss_mb"]
        ),
        "previews_only_ratio": (
            long_run["previews_only_job"]["peak_tree_rss_mb"] / short_run["previews_only_job"]["peak_tree_rss_mb"]
        ),
    }
    return figure
