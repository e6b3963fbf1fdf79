"""P6 (GPU only): P4 on the GPU, GPU utilisation while captioning, time to first caption.

Utilisation is sampled with ``nvidia-smi --query-gpu=utilization.gpu`` every 0.2 s during P4's
timed captioning (handler and raw calls, after the windows are decoded; mean and median are
reported). Time to first caption: ``run_job`` in this process on the warm engine, from the call to
the first ``Engine.generate`` that returns (engine loading, reported separately as
``engine_load_s``, comes on top of it in a cold job).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import redirect_stdout
from io import StringIO
from typing import Any, Optional

from beam_captions.cli import run_job
from beam_captions.inference.engine import Engine

import p4_handler_throughput
from captioning import job_flags, warm_handler
from common import Figure, clip_folder, gpu_name


class GpuSampler:
    """Samples ``utilization.gpu`` of GPU 0 in a thread while active (a context manager)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
                    capture_output=True, text=True, check=False, timeout=10,
                )
            except (OSError, subprocess.TimeoutExpired):
                out = None
            if out is not None and out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def first_caption_s(clips: list[str], model_dir: str, vllm_kwargs: dict[str, Any]) -> Optional[float]:
    """Seconds from calling ``run_job`` to the first caption batch coming back (warm engine)."""
    first: list[float] = []
    original = Engine.generate

    def timed(self: Engine, inputs, sampling_params):
        result = original(self, inputs, sampling_params)
        first.append(time.perf_counter())
        return result

    output = tempfile.mkdtemp(prefix="p6-job-")
    Engine.generate = timed
    try:
        with redirect_stdout(StringIO()):
            start = time.perf_counter()
            run_job(job_flags(clip_folder("p6", clips), output, model_dir, vllm_kwargs), release_models=False)
    finally:
        Engine.generate = original
        shutil.rmtree(output, ignore_errors=True)
    return first[0] - start if first else None


def run(clip: str, windows: int, repeats: int, model_dir: str, vllm_kwargs: dict[str, Any]) -> Figure:
    card = gpu_name()
    if card is None:
        figure = Figure("P6", "GPU: handler windows/s / raw LLM.generate windows/s", "windows/s", (">=", 0.9))
        figure.skipped = "skipped: no GPU"
        return figure
    _, _, load_s = warm_handler(model_dir, vllm_kwargs)
    sampler = GpuSampler()
    figure = p4_handler_throughput.run(
        clip, windows, repeats, 1, model_dir, vllm_kwargs, name="P6", during=lambda: sampler
    )
    figure.title = "GPU: " + figure.title
    figure.details.update(
        gpu=card,
        engine_load_s=load_s,
        gpu_util_mean_pct=statistics.fmean(sampler.samples) if sampler.samples else None,
        gpu_util_median_pct=statistics.median(sampler.samples) if sampler.samples else None,
        gpu_util_samples=len(sampler.samples),
        first_caption_after_job_start_s=first_caption_s([clip], model_dir, vllm_kwargs),
    )
    return figure
