"""What the captioning figures (P3, P4, P6) share: the handler, its warm engine, prepared windows, job flags.

All of them build the handler with the settings ``run_job`` gives ``CaptionWindows`` for the same
flags, so the process-wide engine cache (``load_engine``) hands every caller the one engine loaded
by ``warm_handler``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import Engine
from beam_captions.inference.frame_bounds import model_frame_bounds
from beam_captions.media.decode import PreviewSpec
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms.prepare import PrepareConfig, prepare_clip

from common import MAX_OUTPUT_TOKENS

BATCH_SIZE = 8  # P4's batches (RunInference-style calls); P3's job runs with this --captioning-batch-size too


def make_handler(model_dir: str, vllm_kwargs: dict[str, Any], batch_size: int = BATCH_SIZE) -> VideoCaptionHandler:
    """The handler ``run_job`` builds for ``job_flags(...)`` (equal engine settings, so a shared engine)."""
    return VideoCaptionHandler(
        model_dir,
        model_variant="qwen",
        caption_batch_size=batch_size,
        max_output_tokens=MAX_OUTPUT_TOKENS,
        disable_mmcache=True,
        vllm_kwargs=vllm_kwargs,
    )


def warm_handler(model_dir: str, vllm_kwargs: dict[str, Any]) -> tuple[VideoCaptionHandler, Engine, float]:
    """The handler, its loaded engine and the seconds loading took (0 when it was already loaded)."""
    handler = make_handler(model_dir, vllm_kwargs)
    start = time.perf_counter()
    engine = handler.load_model().engine.start()  # engines start lazily, on first use
    return handler, engine, time.perf_counter() - start


def job_flags(input_path: str, output: str, model_dir: str, vllm_kwargs: dict[str, Any]) -> list[str]:
    """``run_job`` flags for previews and captions with the job's defaults, short captions."""
    return [
        "--input", input_path, "--output", output,
        "--generate-previews", "--generate-captions", "--model-dir", model_dir,
        "--captioning-max-output-tokens", str(MAX_OUTPUT_TOKENS),
        "--captioning-batch-size", str(BATCH_SIZE),
        "--vllm-kwargs", json.dumps(vllm_kwargs),
    ]


def prepare_config(model_dir: str, window_size: int = 256) -> PrepareConfig:
    """What ``PrepareWindows`` uses in the job: the model's frame bounds and 1 fps 240p previews."""
    bounds = model_frame_bounds(model_dir, "qwen")
    return PrepareConfig(window_size=window_size, frame_bounds=bounds, preview=PreviewSpec(1.0, 240))


def prepared_windows(clip: str, config: PrepareConfig) -> list[WindowRecord]:
    """The ``WindowRecord``s ``prepare_clip`` makes of ``clip`` (raises if it failed)."""
    records = [r for r in prepare_clip(ClipRef.from_source(clip), config) if isinstance(r, WindowRecord)]
    if not records:
        raise RuntimeError(f"{clip} gave no windows")
    return records


@contextmanager
def generate_calls() -> Iterator[list[int]]:
    """Record the batch size of every ``Engine.generate`` call made inside the block."""
    sizes: list[int] = []
    original = Engine.generate

    def recorded(self: Engine, inputs, sampling_params):
        sizes.append(len(inputs))
        return original(self, inputs, sampling_params)

    Engine.generate = recorded
    try:
        yield sizes
    finally:
        Engine.generate = original
