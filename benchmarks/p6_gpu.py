"""P6: the whole caption job's windows/s over raw vLLM's, GPU busy fraction and peak GPU memory.

ours: ``run_job`` (DirectRunner, captions only, job defaults but the engine settings) on copies of
the trailer, windows/s from the job's start to its end, the engine already loaded. ceiling: the
same clips' windows, prepared beforehand, handed to the engine all at once (``Engine.generate``).
While each runs, ``nvidia-smi`` is sampled every 0.2 s for ``utilization.gpu`` (busy fraction) and
``memory.used`` (peak). Without a GPU the same code runs on the CPU path and the GPU columns are null:
``benchmarks/gpu_check.sh`` is the one command to run on a GPU machine.
"""

from __future__ import annotations

import json
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
from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input

from captioning import prepare_config, prepared_windows
from common import Figure, clip_copies, gpu_name, interleaved, median_ratio

MAX_TOKENS = 512  # the job's default


class GpuSampler:
    """Samples GPU 0's ``utilization.gpu`` and ``memory.used`` in a thread while active (a context manager)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.busy: list[float] = []
        self.memory_mib: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     "--id=0"], capture_output=True, text=True, check=False, timeout=10,
                )
            except (OSError, subprocess.TimeoutExpired):
                return  # no nvidia-smi: the CPU path
            if out.returncode == 0 and out.stdout.strip():
                busy, memory = (float(v) for v in out.stdout.split(","))
                self.busy.append(busy)
                self.memory_mib.append(memory)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Optional[float]]:
        return {
            "gpu_busy_mean_pct": statistics.fmean(self.busy) if self.busy else None,
            "gpu_busy_fraction": sum(b > 0 for b in self.busy) / len(self.busy) if self.busy else None,
            "gpu_memory_peak_mib": max(self.memory_mib) if self.memory_mib else None,
            "samples": len(self.busy),
        }


def run(clip: str, copies: int, repeats: int, model_dir: str, vllm_kwargs: dict[str, Any]) -> Figure:
    card = gpu_name()
    figure = Figure("P6", f"job windows/s / raw vLLM all-at-once windows/s ({card or 'CPU path, no GPU'})",
                    "windows/s", (">=", 0.85))
    handler = VideoCaptionHandler(model_dir, max_output_tokens=MAX_TOKENS, vllm_kwargs=vllm_kwargs)
    start = time.perf_counter()
    engine = handler.load_model().engine.start()
    load_s = time.perf_counter() - start
    folder = clip_copies("p6", clip, copies)  # distinct clips (links to one file would be one clip)
    windows = prepared_windows(clip, prepare_config(model_dir)) * copies
    inputs = [video_input(engine, r, handler.request.prompt) for r in windows]
    params = handler.request.sampling_params()
    flags = [
        "--input", folder, "--generate-captions", "--model-dir", model_dir, "--no-skip-existing",
        "--captioning-max-output-tokens", str(MAX_TOKENS), "--vllm-kwargs", json.dumps(vllm_kwargs),
    ]
    samplers: dict[str, list[GpuSampler]] = {"job": [], "raw": []}

    def job() -> float:
        output = tempfile.mkdtemp(prefix="p6-job-")
        with GpuSampler() as sampler, redirect_stdout(StringIO()):
            t0 = time.perf_counter()
            counts = run_job([*flags, "--output", output], release_models=False)
            seconds = time.perf_counter() - t0
        shutil.rmtree(output, ignore_errors=True)
        samplers["job"].append(sampler)
        if counts.get("captions", 0) != len(windows):
            raise RuntimeError(f"the job captioned {counts.get('captions', 0)} of {len(windows)} windows")
        return len(windows) / seconds

    def raw() -> float:
        with GpuSampler() as sampler:
            t0 = time.perf_counter()
            engine.generate(inputs, params)
            seconds = time.perf_counter() - t0
        samplers["raw"].append(sampler)
        return len(inputs) / seconds

    raw()  # warm-up
    ours, theirs = interleaved(repeats, job, raw)
    figure.ours, figure.baseline = statistics.median(ours), statistics.median(theirs)
    figure.ratio = median_ratio(ours, theirs)
    figure.details = {
        "gpu": card,
        "clips": copies,
        "windows": len(windows),
        "engine_load_s": load_s,
        "job_windows_per_s": ours,
        "raw_windows_per_s": theirs,
        "job_gpu": [s.summary() for s in samplers["job"]],
        "raw_gpu": [s.summary() for s in samplers["raw"]],
    }
    return figure
