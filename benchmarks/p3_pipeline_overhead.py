"""P3: wall time of the whole DirectRunner job over the same stage functions in a plain Python loop.

Ours: ``run_job`` with previews and captions (tiny captioner) on a folder of clips, on one local worker
like the loop (P7 measures the workers); it also matches the files, writes Parquet, WebP files and
JSON metas. Baseline: ``prepare_clip`` -> ``preview_window``
-> ``handler.run_inference`` in batches of 8, called directly, writing nothing. Both run in this
process on the one warm engine; engine loading is excluded from both.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from typing import Any

from beam_captions.cli import run_job
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms.prepare import prepare_clip
from beam_captions.transforms.previews import preview_window

from captioning import BATCH_SIZE, generate_calls, job_flags, make_handler, prepare_config, warm_handler
from common import Figure, clip_folder, interleaved, median_ratio

WEBP_OPTIONS = {"quality": 50, "compression_level": 6, "threads": 4}  # the job's defaults


def job_seconds(input_dir: str, model_dir: str, vllm_kwargs: dict[str, Any]) -> tuple[float, dict[str, int]]:
    """Wall seconds of ``run_job`` on ``input_dir`` (output into a temporary folder), and its counters."""
    output = tempfile.mkdtemp(prefix="p3-job-")
    try:
        with redirect_stdout(StringIO()):  # the job's summary
            start = time.perf_counter()
            flags = [*job_flags(input_dir, output, model_dir, vllm_kwargs), "--local-workers", "1"]  # as the loop
            counts = run_job(flags, release_models=False)
            elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(output, ignore_errors=True)
    return elapsed, counts


def loop_seconds(clips: list[str], model_dir: str, vllm_kwargs: dict[str, Any]) -> tuple[float, int]:
    """Wall seconds of the stage functions in a plain loop, and the number of captions it made."""
    start = time.perf_counter()
    handler = make_handler(model_dir, vllm_kwargs)
    server = handler.load_model()  # the cached engine: no load
    config = prepare_config(model_dir)
    pending: list[WindowRecord] = []
    captions = 0

    def flush() -> int:
        outcomes = handler.run_inference(pending, server)
        done = sum(1 for record in outcomes if not record.failures and record.caption)
        pending.clear()
        return done

    for clip in clips:
        for element in prepare_clip(ClipRef.from_source(clip), config):
            if not isinstance(element, WindowRecord):
                continue
            pending.extend(r for r in preview_window(element, **WEBP_OPTIONS) if isinstance(r, WindowRecord))
            if len(pending) >= BATCH_SIZE:
                captions += flush()
    if pending:
        captions += flush()
    return time.perf_counter() - start, captions


def run(clips: list[str], repeats: int, model_dir: str, vllm_kwargs: dict[str, Any]) -> Figure:
    figure = Figure("P3", "DirectRunner job wall / plain-loop wall", "wall s", ("<=", 1.25))
    _, _, load_s = warm_handler(model_dir, vllm_kwargs)
    input_dir = clip_folder("p3", clips)
    counts: dict[str, int] = {}
    loop_captions: list[int] = []
    batches: dict[str, list[int]] = {}

    def ours() -> float:
        with generate_calls() as sizes:
            elapsed, found = job_seconds(input_dir, model_dir, vllm_kwargs)
        counts.update(found)
        batches["job"] = sizes
        return elapsed

    def baseline() -> float:
        with generate_calls() as sizes:
            elapsed, made = loop_seconds(clips, model_dir, vllm_kwargs)
        loop_captions.append(made)
        batches["loop"] = sizes
        return elapsed

    ours(), baseline()  # warm-up: imports, Beam's first pipeline, page cache
    mine, theirs = interleaved(repeats, ours, baseline)
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(theirs)
    figure.ratio = median_ratio(mine, theirs)
    figure.details = {
        "clips": clips,
        "repeats": repeats,
        "engine_load_s": load_s,
        "job_counters": counts,
        "loop_captions": loop_captions[-1],
        "generate_batch_sizes": batches,
        "job_wall_s": mine,
        "loop_wall_s": theirs,
    }
    return figure
