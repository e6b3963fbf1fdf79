"""P8: every caption family through the whole job: tiny models on the sample clips, windows/s and prompt tokens.

Each family's tiny model (``beam-captions tiny-models``) captions the three sample clips with
``run_job`` (one window a clip at ``--captioning-sampling-fps 1``), one engine at a time, engine start
included. ``nemotron-3-nano-omni-moe`` is the tiny Omni in the real layout (Mamba + MoE experts): vLLM's
CPU build refuses NemotronH's non-gated experts, so it only runs where a GPU is; on the CPU path its
row records why it was skipped. The figure is the slowest family's windows/s over Qwen2.5's (no target):
it shows each family's path runs, not how the real checkpoints compare.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from typing import Any

from beam_captions.cli import run_job
from beam_captions.tiny_models import build_tiny_models, build_tiny_nemotron_omni

from common import CACHE_DIR, Figure, clip_folder, gpu_name, sample_clips

MAX_TOKENS = 32
FAMILIES = {  # variant label: (--captioning-algorithm, tiny model name)
    "qwen2.5": ("qwen", "captioner"),
    "qwen3": ("qwen3", "captioner-qwen3"),
    "nemotron": ("nemotron", "captioner-nemotron"),
    "nemotron-3-nano-omni": ("nemotron-3-nano-omni", "captioner-nemotron-omni"),
    "nemotron-3-nano-omni-moe": ("nemotron-3-nano-omni", "captioner-nemotron-omni-moe"),
}


def _models() -> dict[str, str]:
    root = os.path.join(CACHE_DIR, "models")
    models = build_tiny_models(root, nemotron=True)
    models["captioner-nemotron-omni-moe"] = build_tiny_nemotron_omni(os.path.join(root, "captioner-nemotron-omni-moe"), moe=True)
    return models


def _one(variant: str, model_dir: str, folder: str, vllm_kwargs: dict[str, Any]) -> dict[str, Any]:
    output = tempfile.mkdtemp(prefix="p7-")
    flags = [
        "--input", folder, "--output", output, "--generate-captions", "--captioning-algorithm", variant,
        "--model-dir", model_dir, "--captioning-sampling-fps", "1.0", "--no-skip-existing",
        "--captioning-max-output-tokens", str(MAX_TOKENS), "--vllm-kwargs", json.dumps(vllm_kwargs),
    ]
    try:
        with redirect_stdout(StringIO()):
            t0 = time.perf_counter()
            counts = run_job(flags, release_models=True)  # one engine at a time
            seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(output, ignore_errors=True)
    captions = counts.get("captions", 0)
    return {
        "windows": counts.get("windows", 0),
        "captions": captions,
        "seconds": seconds,
        "windows_per_s": captions / seconds,
        "prompt_tokens_per_window": counts.get("caption_prompt_tokens", 0) / max(captions, 1),
    }


def run(vllm_kwargs: dict[str, Any]) -> Figure:
    card = gpu_name()
    figure = Figure("P8", f"slowest caption family / qwen2.5, whole job, tiny models ({card or 'CPU path, no GPU'})",
                    "windows/s", ("", 0.0))
    models = _models()
    folder = clip_folder("p7", sample_clips())
    rows: dict[str, Any] = {}
    for label, (variant, model) in FAMILIES.items():
        if label.endswith("-moe") and not card:
            rows[label] = {"skipped": "vLLM CPU: NotImplementedError: is_act_and_mul=False is supported only for "
                                      "CUDA, XPU and ROCm (NemotronH MoE experts)"}
            continue
        try:
            rows[label] = _one(variant, models[model], folder, vllm_kwargs)
        except Exception as error:  # noqa: BLE001 - one family failing must not hide the others
            rows[label] = {"error": f"{type(error).__name__}: {error}"[:500]}
    rates = [r["windows_per_s"] for r in rows.values() if r.get("windows_per_s")]
    base = rows.get("qwen2.5", {}).get("windows_per_s")
    if rates and base:
        figure.ours, figure.baseline = min(rates), base
        figure.ratio = figure.ours / figure.baseline
    else:
        figure.skipped = "no family captioned"
    figure.details = {"gpu": card, "families": rows}
    return figure
