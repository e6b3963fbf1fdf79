"""P4b: caption throughput inside a running pipeline over vLLM's continuous-batching ceiling.

Windows are prepared beforehand (so decoding does not compete for the CPU) from the trailer cut
into short windows, so that they differ and their captions end at different lengths (the tiny
models stop at varied lengths; captions may run to the job's default 512 tokens).

- ours: a DirectRunner pipeline ``windows | CaptionWindows(handler)`` (``ServeWindows``:
  each window submitted as it arrives, results as they finish), wall time of ``pipeline.run()``.
- old: the same pipeline through Beam's ``RunInference(handler)`` in batches of 8, each batch one
  blocking engine call (the path before continuous batching).
- ceiling: every window's input dict handed to the engine at once in one call
  (``Engine.generate``: vLLM's async engine with all requests in flight), inputs built beforehand.

``details["pipeline_start_s"]`` is the wall time of the same pipeline given no windows (graph, runner and
step set-up): a fixed cost that a short run shows and a job amortises over its windows.
``details["short_captions"]`` is the same pair with captions cut at ``SHORT_TOKENS`` tokens, over at least
``SHORT_WINDOWS`` windows: the engine then serves a window in about the time a GPU takes, so what the pipeline
costs per window (its start set apart) shows on a CPU too. ``details["short_captions"]["shared_engine"]`` runs
that short-caption pipeline again with the engine shared across processes (``share_across_processes``: Beam's
proxy, its server in this process as in a machine's first SDK process), the frames lent through shared memory
(today's code) against pickled through the proxy (``BEAM_CAPTIONS_SHARED_FRAMES=0``, the path before),
interleaved, with the windows' model frames (the tiny model's bound: small) and with them upscaled ``UPSCALE``
times (nearest: about the reference's 1008x560 model frames; vLLM's processor scales them down again). It
runs last, as the shared handler sets this process's malloc threshold (``give_large_buffers_back``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import RunInference

from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input
from beam_captions.inference.shared_frames import SWITCH
from beam_captions.records import WindowRecord
from beam_captions.transforms.caption import CaptionWindows

from captioning import prepare_config, prepared_windows
from common import Figure, interleaved, median_ratio

OLD_BATCH = 8  # the old default --captioning-batch-size
MAX_TOKENS = 512  # the job's default --captioning-max-output-tokens
SHORT_TOKENS = 4  # details["short_captions"]: an engine about as fast per window as a GPU's
SHORT_WINDOWS = 512  # ... and as many windows as a GPU run's P4b, so that the pipeline's start is amortised
WINDOW_SIZE = 48  # short windows: more distinct windows out of one clip
UPSCALE = 5  # details["short_captions"]["shared_engine"]: frames also at about the reference's model-frame size


# The pipeline runs in this process: windows enter it by index (``_window``) rather than inside ``Create``,
# which would pickle every frame into the pipeline graph (seconds per run, not what a job pays: there the
# windows come out of the decode step fused with the caption step).
_windows: list[WindowRecord] = []
_lengths: list[int] = []  # filled by ``_collect``


def _window(index: int) -> WindowRecord:
    return _windows[index]



def _collect(element: Any) -> None:
    record = element
    if isinstance(record, WindowRecord):
        if not record.caption:
            raise RuntimeError(f"window {record.window_index} got no caption")
        _lengths.append(record.caption_check.num_tokens)


def _pipeline_rate(records: list[WindowRecord], caption: beam.PTransform) -> tuple[float, list[int]]:
    """Windows/s of a pipeline that captions ``records``; also each caption's token count."""
    _windows[:], _lengths[:] = records, []
    start = time.perf_counter()
    with beam.Pipeline() as pipeline:
        indices = pipeline | beam.Create(list(range(len(records))), reshuffle=False) | beam.Map(_window)
        _ = indices | caption | beam.Map(_collect)
    seconds = time.perf_counter() - start
    if len(_lengths) != len(records):
        raise RuntimeError(f"{len(_lengths)} captions for {len(records)} windows")
    return len(records) / seconds, list(_lengths)


def _pair(records: list[WindowRecord], handler: VideoCaptionHandler, engine: Any,
          repeats: int) -> tuple[list[float], list[float], list[int]]:
    """Windows/s of the pipeline and of the ceiling (interleaved ``repeats`` times), and the caption lengths."""
    inputs = [video_input(engine, r, handler.request.prompt) for r in records]
    params = handler.request.sampling_params()
    lengths: list[int] = []

    def ceiling() -> float:
        start = time.perf_counter()
        engine.generate(inputs, params)
        return len(inputs) / (time.perf_counter() - start)

    def ours() -> float:
        rate, lengths[:] = _pipeline_rate(records, CaptionWindows(handler=handler))
        return rate

    ceiling(), ours()  # warm-up (and the pipeline machinery's first import)
    mine, theirs = interleaved(repeats, ours, ceiling)
    return mine, theirs, lengths


def _ms_per_window(rate: float, windows: int, start_s: float) -> float:
    """What the pipeline takes per window (ms), its start set apart."""
    return 1000 * (windows / rate - start_s) / windows


def _shared_engine(records: list[WindowRecord], model_dir: str, vllm_kwargs: dict[str, Any], repeats: int,
                   start_s: float) -> dict[str, Any]:
    """The short-caption pipeline on an engine shared across processes: frames lent against pickled."""
    handler = VideoCaptionHandler(model_dir, max_output_tokens=SHORT_TOKENS, caption_batch_size=len(records),
                                  vllm_kwargs=vllm_kwargs, share_across_processes=True)

    def frames(lent: bool) -> Callable[[], float]:
        def go() -> float:
            saved = os.environ.get(SWITCH)
            os.environ[SWITCH] = "1" if lent else "0"
            try:
                return _pipeline_rate(records, CaptionWindows(handler=handler))[0]
            finally:
                if saved is None:
                    del os.environ[SWITCH]
                else:
                    os.environ[SWITCH] = saved

        return go

    frames(True)()  # warm-up (the first time: the proxy's server starts in this process)
    lent, pickled = interleaved(repeats, frames(True), frames(False))
    ms = {name: [_ms_per_window(rate, len(records), start_s) for rate in rates]
          for name, rates in (("shared_memory", lent), ("pickled", pickled))}
    return {
        "frames": list(records[0].frames.shape),
        "bytes_of_frames_per_window": statistics.median(r.frames.nbytes for r in records),
        "windows_per_s": {"shared_memory": lent, "pickled": pickled},
        "pipeline_ms_per_window": {name: statistics.median(values) for name, values in ms.items()},
        "ms_per_window_saved": statistics.median(p - m for m, p in zip(ms["shared_memory"], ms["pickled"])),
        "cost_ratio": median_ratio(ms["shared_memory"], ms["pickled"]),
    }


def run(clip: str, windows: int, repeats: int, model_dir: str, vllm_kwargs: dict[str, Any]) -> Figure:
    figure = Figure(
        "P4b", "pipeline captions windows/s / vLLM all-at-once windows/s (continuous-batching ceiling)",
        "windows/s", (">=", 0.85),
    )
    handler = VideoCaptionHandler(
        model_dir, max_output_tokens=MAX_TOKENS, caption_batch_size=max(64, windows), vllm_kwargs=vllm_kwargs
    )
    old_handler = VideoCaptionHandler(
        model_dir, max_output_tokens=MAX_TOKENS, caption_batch_size=OLD_BATCH, vllm_kwargs=vllm_kwargs
    )
    engine = handler.load_model().engine.start()
    start = time.perf_counter()
    prepared = prepared_windows(clip, prepare_config(model_dir, window_size=WINDOW_SIZE))
    prepare_s = time.perf_counter() - start
    records = [prepared[i % len(prepared)] for i in range(windows)]
    mine, theirs, lengths = _pair(records, handler, engine, repeats)
    short_records = [prepared[i % len(prepared)] for i in range(max(windows, SHORT_WINDOWS))]
    short_handler = VideoCaptionHandler(
        model_dir, max_output_tokens=SHORT_TOKENS, caption_batch_size=len(short_records), vllm_kwargs=vllm_kwargs
    )
    short_mine, short_theirs, _ = _pair(short_records, short_handler, engine, repeats)

    def old() -> float:
        return _pipeline_rate(records, RunInference(old_handler))[0]

    def start_only() -> float:
        begin = time.perf_counter()
        _pipeline_rate([], CaptionWindows(handler=handler))
        return time.perf_counter() - begin

    start_s = statistics.median(start_only() for _ in range(3))
    upscaled = [r.replace(frames=np.ascontiguousarray(r.frames.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)))
                for r in prepared]
    previous = [old() for _ in range(max(1, repeats // 2))]
    figure.ours, figure.baseline = statistics.median(mine), statistics.median(theirs)
    figure.ratio = median_ratio(mine, theirs)
    figure.details = {
        "clip": clip,
        "windows": windows,
        "distinct_windows": len(prepared),
        "window_size": WINDOW_SIZE,
        "frames_per_window": prepared[0].frames.shape[0],
        "frame_size": list(prepared[0].frames.shape[1:3]),
        "prepare_s": prepare_s,
        "max_output_tokens": MAX_TOKENS,
        "caption_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "pipeline_windows_per_s": mine,
        "pipeline_start_s": start_s,
        "ceiling_windows_per_s": theirs,
        "old_runinference_batch8_windows_per_s": previous,
        "old_over_ceiling": statistics.median(previous) / figure.baseline,
        "short_captions": {
            "max_output_tokens": SHORT_TOKENS,
            "windows": len(short_records),
            "pipeline_windows_per_s": short_mine,
            "ceiling_windows_per_s": short_theirs,
            "ratio": median_ratio(short_mine, short_theirs),
            # the pipeline's own cost per window, its start set apart
            "pipeline_ms_per_window_over_ceiling": _ms_per_window(
                statistics.median(short_mine), len(short_records), start_s) - 1000 / statistics.median(short_theirs),
            "shared_engine": {
                "model_frames": _shared_engine(short_records, model_dir, vllm_kwargs, repeats, start_s),
                "upscaled_frames": _shared_engine(
                    [upscaled[i % len(upscaled)] for i in range(len(short_records))], model_dir, vllm_kwargs,
                    repeats, start_s),
            },
        },
    }
    return figure
