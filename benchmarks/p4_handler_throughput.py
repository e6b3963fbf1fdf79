"""P4: caption handler throughput (windows/s) over raw ``vllm.LLM.generate`` on the same engine.

Both caption the same prepared windows in batches of the same size with the same sampling
parameters. Ours: ``handler.run_inference(batch, server)`` (builds each vLLM input, calls the engine,
checks and copies the records). Baseline: ``engine.generate(batch_inputs, params)`` (vLLM directly) on input
dicts built once beforehand with ``video_input``. Also reports both at batch sizes 1, 4, 8, 16.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input
from beam_captions.inference.engine import Engine
from beam_captions.inference.serving import WindowServer
from beam_captions.records import WindowRecord

from captioning import BATCH_SIZE, prepare_config, prepared_windows, warm_handler
from common import Figure, interleaved, median_ratio

SWEEP = (1, 4, 8, 16)


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def handler_rate(handler: VideoCaptionHandler, engine: Engine, records: list[WindowRecord], batch: int) -> float:
    """Windows per second through ``handler.run_inference``; raises if a window failed."""
    server = WindowServer(handler, engine, batch)
    start = time.perf_counter()
    for part in _batches(records, batch):
        for record in handler.run_inference(part, server):
            if record.failures:
                raise RuntimeError(f"caption failed: {record.failures[0].message}")
    return len(records) / (time.perf_counter() - start)


def raw_rate(engine: Engine, inputs: list[dict], params: Any, batch: int) -> float:
    """Windows per second through the engine (vLLM's async engine, a batch at a time) on ready-made inputs."""
    start = time.perf_counter()
    for part in _batches(inputs, batch):
        engine.generate(list(part), params)
    return len(inputs) / (time.perf_counter() - start)


def run(
    clip: str, windows: int, repeats: int, sweep_repeats: int, model_dir: str, vllm_kwargs: dict[str, Any],
    name: str = "P4", during: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Figure:
    """``windows`` inputs: the clip's windows (window 256, model pixel bound), repeated as needed.

    ``during()`` is entered around the timed captioning (P6 samples the GPU in it).
    """
    figure = Figure(name, "caption handler windows/s / raw LLM.generate windows/s", "windows/s", (">=", 0.9))
    handler, engine, load_s = warm_handler(model_dir, vllm_kwargs)
    prepared = prepared_windows(clip, prepare_config(model_dir))
    records = [prepared[i % len(prepared)] for i in range(windows)]
    start = time.perf_counter()
    inputs = [video_input(engine, r, handler.request.prompt) for r in records]
    input_ms = (time.perf_counter() - start) * 1000 / len(records)
    params = handler.request.sampling_params()

    handler_rate(handler, engine, records[:BATCH_SIZE], BATCH_SIZE)  # warm-up
    raw_rate(engine, inputs[:BATCH_SIZE], params, BATCH_SIZE)
    with during():
        mine, theirs = interleaved(
            repeats,
            lambda: handler_rate(handler, engine, records, BATCH_SIZE),
            lambda: raw_rate(engine, inputs, params, BATCH_SIZE),
        )
        sweep = {}
        for batch in SWEEP:
            ours_b, raw_b = interleaved(
                sweep_repeats,
                lambda: handler_rate(handler, engine, records, batch),
                lambda: raw_rate(engine, inputs, params, batch),
            )
            sweep[batch] = {"handler": statistics.median(ours_b), "raw": statistics.median(raw_b)}
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(theirs)
    figure.ratio = median_ratio(mine, theirs)
    figure.details = {
        "clip": clip,
        "windows": windows,
        "distinct_windows": len(prepared),
        "frames_per_window": prepared[0].frames.shape[0],
        "frame_size": list(prepared[0].frames.shape[1:3]),
        "batch_size": BATCH_SIZE,
        "repeats": repeats,
        "engine_load_s": load_s,
        "video_input_ms_per_window": input_ms,
        "handler_windows_per_s": mine,
        "raw_windows_per_s": theirs,
        "sweep_windows_per_s": sweep,
    }
    return figure
