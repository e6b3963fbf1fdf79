"""Tiny random-weight checkpoints, built offline in seconds, for tests, benchmarks and CPU trial runs.

``qwen``: Qwen2.5-VL and Qwen3-VL captioners, Qwen2 and Qwen3 text enhancers. ``nemotron``: NVIDIA
Nemotron Nano VL v2 and Nano Omni captioners. ``common``: what both share (tokenizer corpus and BPE,
token look-ups, chat-template items, the atomic build of a model directory); it imports neither.
``build_tiny_models`` builds a whole set under one folder (``beam-captions tiny-models DIR``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from beam_captions.tiny_models.common import MARKER_FILE
from beam_captions.tiny_models.nemotron import (
    OMNI_ARCHITECTURE,
    VL_ARCHITECTURE,
    build_tiny_nemotron_omni,
    build_tiny_nemotron_vl,
    nemotron_video_prompt,
)
from beam_captions.tiny_models.qwen import (
    build_tiny_qwen2_text,
    build_tiny_qwen3_text,
    build_tiny_qwen3_vl,
    build_tiny_qwen25_vl,
    with_real_processor_config,
)

__all__ = [
    "MARKER_FILE",
    "OMNI_ARCHITECTURE",
    "VL_ARCHITECTURE",
    "build_tiny_models",
    "build_tiny_nemotron_omni",
    "build_tiny_nemotron_vl",
    "build_tiny_qwen25_vl",
    "build_tiny_qwen2_text",
    "build_tiny_qwen3_text",
    "build_tiny_qwen3_vl",
    "nemotron_video_prompt",
    "with_real_processor_config",
]

_BUILDERS: dict[str, Callable[[str, int], str]] = {
    "captioner": build_tiny_qwen25_vl,
    "captioner-qwen3": build_tiny_qwen3_vl,
    "enhancer": build_tiny_qwen2_text,
    "enhancer-qwen3": build_tiny_qwen3_text,
}


def _nemotron_builders() -> dict[str, Callable[[str, int], str]]:
    return {"captioner-nemotron": build_tiny_nemotron_vl, "captioner-nemotron-omni": build_tiny_nemotron_omni}


def build_tiny_models(root: str, seed: int = 0, nemotron: bool = False) -> dict[str, str]:
    """Build the tiny Qwen models (and with ``nemotron`` the tiny Nemotron VL and Omni) under ``root``.

    Returns ``{name: model_dir}``. The Nemotron ones are the CPU forms (``tiny_models.nemotron``): they
    load with ``trust_remote_code``, which their caption variants turn on.
    """
    builders = {**_BUILDERS, **(_nemotron_builders() if nemotron else {})}
    return {name: build(os.path.join(root, name), seed) for name, build in builders.items()}
