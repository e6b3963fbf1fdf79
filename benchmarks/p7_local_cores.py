"""P7: a previews-only job pinned to one core over the same job with default settings on every core.

Each job is ``python -m beam_captions --generate-previews`` on the same folder of clips (copies of one
clip under different names) in a fresh subprocess; the pinned one runs with its CPU affinity set to
the first usable core, so the job sees one core and keeps its single in-memory worker. The figure is
wall time pinned / wall time default: how much of the machine a local run puts to work.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

from common import REPO_DIR, Figure, children_cpu, clip_copies, interleaved, median_ratio


def job_seconds(input_dir: str, cores: Optional[set[int]], cpu_seconds: list[float]) -> float:
    """Wall seconds of one previews-only job (output to a temporary folder); ``cores`` pins it."""
    output = tempfile.mkdtemp(prefix="p7-job-")
    command = [sys.executable, "-m", "beam_captions", "--input", input_dir, "--output", output, "--generate-previews"]
    env = dict(os.environ, PYTHONPATH=REPO_DIR)
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    cpu_before = children_cpu()
    start = time.perf_counter()
    try:
        subprocess.run(command, cwd=REPO_DIR, env=env, preexec_fn=pin, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        cpu_seconds.append(children_cpu() - cpu_before)
        shutil.rmtree(output, ignore_errors=True)


def run(clip: str, copies: int, repeats: int) -> Figure:
    usable = sorted(os.sched_getaffinity(0))
    target = 0.8 * len(usable)
    figure = Figure("P7", "previews-only job wall: pinned to 1 core / default on every core", "wall s", (">=", target))
    if len(usable) < 2:
        figure.skipped = "skipped: one usable core"
        return figure
    input_dir = clip_copies("p7", clip, copies)
    cpu_default: list[float] = []
    cpu_pinned: list[float] = []
    every_core, one_core = interleaved(
        repeats,
        lambda: job_seconds(input_dir, None, cpu_default),
        lambda: job_seconds(input_dir, {usable[0]}, cpu_pinned),
    )
    figure.ours, figure.baseline = statistics.median(every_core), statistics.median(one_core)
    figure.ratio = median_ratio(one_core, every_core)
    figure.details = {
        "clip": clip,
        "copies": copies,
        "repeats": repeats,
        "usable_cores": len(usable),
        "target": f">= 0.8 x {len(usable)} cores",
        "default_wall_s": every_core,
        "pinned_wall_s": one_core,
        "default_cpu_s": cpu_default,
        "pinned_cpu_s": cpu_pinned,
    }
    return figure
