"""Tiny Nemotron VL / Nano Omni checkpoints: build, and vLLM's real processor on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from beam_captions.tiny_models import (
    MARKER_FILE,
    OMNI_ARCHITECTURE,
    VL_ARCHITECTURE,
    build_tiny_nemotron_omni,
    build_tiny_nemotron_vl,
    nemotron_video_prompt,
)

PROMPT = "Describe this video."
FRAMES, HEIGHT, WIDTH = 8, 360, 640
# What vLLM's NanoNemotronVLProcessor does with 640x360 frames:
# VL v2: every frame resized to 512x512 -> (512/16)^2 * 0.5^2 = 256 tokens per frame.
# Omni: ~1024 patches keeping the aspect ratio -> 24x42 patches (384x672 px) -> 12*21 = 252
# tokens per tubelet of 2 frames.
EXPECTED = {
    "vl": {"frame_hw": (512, 512), "groups": 8, "tokens_per_group": 256},
    "omni": {"frame_hw": (384, 672), "groups": 4, "tokens_per_group": 252},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("nemotron")
    return {
        "vl": build_tiny_nemotron_vl(str(root / "vl")),
        "omni": build_tiny_nemotron_omni(str(root / "omni")),
        "omni-moe": build_tiny_nemotron_omni(str(root / "omni-moe"), moe=True),
    }


def _video() -> tuple[np.ndarray, dict]:
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    metadata = {
        "total_num_frames": FRAMES,
        "fps": 2.0,
        "duration": FRAMES / 2.0,
        "video_backend": "opencv",
        "frames_indices": list(range(FRAMES)),
        "do_sample_frames": False,
    }
    return frames, metadata


def _family(name: str) -> str:
    return "omni" if name.startswith("omni") else "vl"


def test_builds_small_deterministic_checkpoints(model_dirs: dict[str, str], tmp_path: Path) -> None:
    for name, path in model_dirs.items():
        config = json.loads((Path(path) / "config.json").read_text())
        assert config["architectures"] == [OMNI_ARCHITECTURE if name.startswith("omni") else VL_ARCHITECTURE]
        pattern = config["llm_config"]["hybrid_override_pattern"]
        assert "M" in pattern and "*" in pattern
        assert ("E" in pattern) == (name == "omni-moe")
        assert (Path(path) / MARKER_FILE).is_file()
        assert sum(p.stat().st_size for p in Path(path).iterdir()) < 2_000_000
    again = build_tiny_nemotron_vl(str(tmp_path / "vl"))
    assert (Path(again) / "model.safetensors").read_bytes() == (
        Path(model_dirs["vl"]) / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("name", ["vl", "omni", "omni-moe"])
def test_vllm_processor_builds_video_inputs(model_dirs: dict[str, str], name: str) -> None:
    """vLLM's own NanoNemotronVLProcessor on the tiny config: frame size, tubelets, placeholder count."""
    pytest.importorskip("vllm")
    from transformers import AutoConfig, AutoTokenizer
    from vllm.transformers_utils.processors.nano_nemotron_vl import NanoNemotronVLProcessor

    path = model_dirs[name]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor = NanoNemotronVLProcessor(config, tokenizer, max_model_len=4096, video_token="<image>")
    thinking = False if name.startswith("omni") else None
    prompt = nemotron_video_prompt(tokenizer, PROMPT, thinking=thinking)
    assert prompt.startswith("<|im_start|>user\n<video>" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.endswith("<think></think>") == name.startswith("omni")

    out = processor(text=prompt, videos=[_video()], return_tensors="pt")
    expected = EXPECTED[_family(name)]
    assert tuple(out["pixel_values_flat_video"].shape) == (FRAMES, 3, *expected["frame_hw"])
    assert out["video_num_patches"].tolist() == [FRAMES]
    ids = out["input_ids"][0].tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == expected["groups"] * expected["tokens_per_group"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<img>")) == expected["groups"]
    text = tokenizer.decode(ids)
    assert "<video>" not in text
    if name.startswith("omni"):
        assert "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img>" in text
    else:
        assert "Frame 1 sampled at 0.00 seconds: <img>" in text
        assert "\nFrame 8 sampled at 3.50 seconds: <img>" in text


# The engines themselves run in tests/test_nemotron_e2e.py: the whole job, one engine per family.
