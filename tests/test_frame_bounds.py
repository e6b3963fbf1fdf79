"""Frame bounds: the reference's video bounds per window, and what a checkpoint's configs may change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from beam_captions.inference.frame_bounds import FrameBounds, model_frame_bounds, reference_bounds
from beam_captions.tiny_models import with_real_processor_config

P25, P3 = 28 * 28, 32 * 32  # pixels per merged patch


@pytest.mark.parametrize(("variant", "unit"), [("qwen", P25), ("qwen2.5", P25), ("qwen3", P3)])
@pytest.mark.parametrize(
    ("frames", "max_patches"),
    [
        (4, 768),  # few frames: the per-frame cap
        (18, 768),  # a 256-frame window at 30 fps
        (64, 768),  # 24576 * 2 / 64 = 768: where the whole-window cap starts to bind
        (66, 24576 * 2 / 66),
        (200, 24576 * 2 / 200),
        (768, 128 * 1.05),  # the whole-window share never goes below 1.05 x the minimum
    ],
)
def test_reference_bounds_follow_qwen_vl_utils(variant: str, unit: int, frames: int, max_patches: float) -> None:
    low, high = reference_bounds(variant).pixels(frames)
    assert low == 128 * unit
    assert high == int(max_patches * unit) or abs(high - max_patches * unit) < 1


def test_frame_size_depends_on_the_windows_frame_count() -> None:
    bounds = reference_bounds("qwen2.5")
    assert bounds.frame_size(1920, 1080, 18) == (1008, 560)  # 36 x 20 patches = 720 tokens a frame pair
    assert bounds.frame_size(3840, 2160, 18) == (1008, 560)
    width, height = bounds.frame_size(1920, 1080, 200)
    assert width * height <= 24576 * P25 * 2 // 200 and (width, height) == (560, 308)
    assert bounds.frame_size(64, 48, 8) == (392, 280)  # small clips are scaled up to the minimum
    qwen3 = reference_bounds("qwen3").frame_size(1920, 1080, 18)
    assert qwen3 == (1152, 640) and qwen3[0] % 32 == 0 and qwen3[1] % 32 == 0


def _model_dir(tmp_path: Path, **configs: dict) -> str:
    for name, config in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_image_processor_config_is_ignored(tmp_path: Path) -> None:
    real = _model_dir(tmp_path, preprocessor_config={"min_pixels": 3136, "max_pixels": 16384 * P25})
    assert model_frame_bounds(real, "qwen2.5") == reference_bounds("qwen2.5")
    (tmp_path / "small").mkdir()
    small = _model_dir(tmp_path / "small", preprocessor_config={"min_pixels": 56 * 56, "max_pixels": 56 * 56})
    assert model_frame_bounds(small, "qwen2.5") == reference_bounds("qwen2.5")
    assert model_frame_bounds(None, "qwen3") == reference_bounds("qwen3")


@pytest.mark.parametrize(
    ("config", "frames", "expected"),
    [
        ({"min_pixels": 3136, "max_pixels": 16384 * P25}, 8, (128 * P25, 768 * P25)),  # looser: no change
        ({"size": {"shortest_edge": 3136, "longest_edge": 16384 * P25}}, 200, (128 * P25, 24576 * P25 * 2 // 200)),
        ({"min_pixels": 3136, "max_pixels": 256 * P25}, 8, (128 * P25, 256 * P25)),  # a lower maximum
        ({"size": {"shortest_edge": 200 * P25, "longest_edge": 400 * P25}}, 8, (200 * P25, 400 * P25)),  # a higher minimum
        ({"min_pixels": 4 * P25, "max_pixels": 32 * P25}, 8, (32 * P25, 32 * P25)),  # below our minimum: its max wins
        ({"max_pixels": 300 * P25}, 18, (128 * P25, 300 * P25)),
    ],
)
def test_a_qwen25_video_config_tightens_but_never_loosens(
    tmp_path: Path, config: dict, frames: int, expected: tuple[int, int]
) -> None:
    folder = _model_dir(tmp_path, video_preprocessor_config=config)
    bounds = model_frame_bounds(folder, "qwen2.5")
    reference_low, reference_high = reference_bounds("qwen2.5").pixels(frames)
    low, high = bounds.pixels(frames)
    assert (low, high) == expected
    assert high <= reference_high and (low >= reference_low or low == high)


def test_a_qwen3_video_config_bounds_the_whole_window(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, video_preprocessor_config={"size": {"shortest_edge": 4 * P3, "longest_edge": 24576 * P3}})
    bounds = model_frame_bounds(folder, "qwen3")
    assert bounds.pixels(8) == (128 * P3, 768 * P3)  # 24576 / 8 = 3072 patches a frame: looser than the reference
    assert bounds.pixels(64) == (128 * P3, 384 * P3)  # 24576 / 64: tighter than the reference's 768
    assert bounds.pixels(200) == (24576 * P3 // 200,) * 2  # below the reference's minimum: the maximum wins


def test_real_processor_configs(tiny_models: dict[str, str], tmp_path: Path) -> None:
    qwen25 = with_real_processor_config(tiny_models["captioner"], str(tmp_path / "qwen25"))
    assert not (Path(qwen25) / "video_preprocessor_config.json").exists()
    image = json.loads((Path(qwen25) / "preprocessor_config.json").read_text())
    assert (image["min_pixels"], image["max_pixels"], image["patch_size"]) == (3136, 12845056, 14)
    assert model_frame_bounds(qwen25, "qwen2.5") == reference_bounds("qwen2.5")
    qwen3 = with_real_processor_config(tiny_models["captioner-qwen3"], str(tmp_path / "qwen3"), qwen3=True)
    video = json.loads((Path(qwen3) / "video_preprocessor_config.json").read_text())
    assert video["size"] == {"shortest_edge": 128 * P3, "longest_edge": 768 * P3}  # transformers' defaults
    assert model_frame_bounds(qwen3, "qwen3").pixels(8) == (768 * P3 // 8,) * 2


def test_bounds_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        FrameBounds(10, 5)
    with pytest.raises(ValueError):
        FrameBounds(1, 5, factor=0)
    with pytest.raises(ValueError):
        reference_bounds("qwen2.5").pixels(0)
