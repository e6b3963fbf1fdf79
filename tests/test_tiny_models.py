"""Tests for the offline tiny Qwen checkpoints (transformers only, no vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
)

from beam_captions.tiny_models import qwen as tm  # noqa: E402
from beam_captions.tiny_models import (  # noqa: E402
    MARKER_FILE,
    build_tiny_models,
    build_tiny_qwen2_text,
    build_tiny_qwen25_vl,
)

VL_MODELS = ("captioner", "captioner-qwen3")
TEXT_MODELS = ("enhancer", "enhancer-qwen3")
VIDEO_PROMPT = "Describe this video."
VIDEO_MESSAGES = [
    {"role": "system", "content": "You are a careful captioner."},
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": VIDEO_PROMPT}]},
]


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, str]) -> dict[str, str]:
    """All tiny models (the session build from conftest, made with HF_HUB_OFFLINE=1)."""
    return tiny_models


def _file_bytes(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_builds_all_models_with_expected_architectures(models: dict[str, str]) -> None:
    assert set(models) == set(VL_MODELS + TEXT_MODELS)
    expected = {
        "captioner": "Qwen2_5_VLForConditionalGeneration",
        "captioner-qwen3": "Qwen3VLForConditionalGeneration",
        "enhancer": "Qwen2ForCausalLM",
        "enhancer-qwen3": "Qwen3ForCausalLM",
    }
    for name, path in models.items():
        assert Path(path).name == name
        assert (Path(path) / MARKER_FILE).is_file()
        assert AutoConfig.from_pretrained(path, local_files_only=True).architectures == [expected[name]]
        assert sum(p.stat().st_size for p in Path(path).iterdir()) < 4_000_000


@pytest.mark.parametrize("name", VL_MODELS)
def test_vl_config_token_ids_come_from_tokenizer(models: dict[str, str], name: str) -> None:
    path = models[name]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    ids = tokenizer.convert_tokens_to_ids
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.image_token_id == ids("<|image_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert config.text_config.vocab_size >= len(tokenizer)
    eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    assert set(eos) == {ids("<|im_end|>"), ids("<|endoftext|>")}


@pytest.mark.parametrize("name", VL_MODELS)
def test_vl_chat_template_renders_video_and_system(models: dict[str, str], name: str) -> None:
    processor = AutoProcessor.from_pretrained(models[name], local_files_only=True)
    text = processor.apply_chat_template(VIDEO_MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a careful captioner.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe this video.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    rendered = processor.apply_chat_template(image, add_generation_prompt=False, tokenize=False)
    assert rendered == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"


@pytest.mark.parametrize(
    ("name", "file", "bounds"),
    [
        ("captioner", "preprocessor_config.json", (4 * 28 * 28, 32 * 28 * 28)),
        ("captioner", "video_preprocessor_config.json", (4 * 28 * 28, 32 * 28 * 28)),
        ("captioner-qwen3", "preprocessor_config.json", (4 * 32 * 32, 32 * 32 * 32)),
        ("captioner-qwen3", "video_preprocessor_config.json", (4 * 32 * 32, 32 * 32 * 32)),
    ],
)
def test_pixel_bounds_are_recorded(
    models: dict[str, str], name: str, file: str, bounds: tuple[int, int]
) -> None:
    data = json.loads((Path(models[name]) / file).read_text())
    assert (data["size"]["shortest_edge"], data["size"]["longest_edge"]) == bounds
    if name == "captioner":
        assert (data["min_pixels"], data["max_pixels"]) == bounds
    processor = AutoProcessor.from_pretrained(models[name], local_files_only=True)
    size = processor.video_processor.size
    assert (size.shortest_edge, size.longest_edge) == bounds


def test_qwen2_text_template_plain_string_content(models: dict[str, str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models["enhancer"], local_files_only=True)
    messages = [{"role": "system", "content": "Rewrite."}, {"role": "user", "content": "a red car"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nRewrite.<|im_end|>\n"
        "<|im_start|>user\na red car<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_text_template_supports_enable_thinking(models: dict[str, str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models["enhancer-qwen3"], local_files_only=True)
    messages = [{"role": "user", "content": "a red car"}]
    render = tokenizer.apply_chat_template
    off = render(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    on = render(messages, add_generation_prompt=True, tokenize=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<think>") != tokenizer.unk_token_id


def test_text_models_generate_word_pieces(models: dict[str, str]) -> None:
    for name in TEXT_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(models[name], local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(models[name], local_files_only=True)
        messages = [{"role": "user", "content": "a car"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text.strip() and all(c.isalpha() or c == " " for c in text)


@pytest.mark.parametrize("name", VL_MODELS)
def test_vl_models_caption_a_video(models: dict[str, str], name: str) -> None:
    processor = AutoProcessor.from_pretrained(models[name], local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(models[name], local_files_only=True)
    frames = np.random.default_rng(0).integers(0, 256, size=(8, 112, 112, 3), dtype=np.uint8)
    text = processor.apply_chat_template(VIDEO_MESSAGES, add_generation_prompt=True, tokenize=False)
    metadata = {"total_num_frames": 8, "fps": 2.0, "duration": 4.0, "frames_indices": list(range(8))}
    inputs = processor(
        text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    caption = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert caption.strip()


def test_builds_are_deterministic(models: dict[str, str], tmp_path: Path) -> None:
    again = build_tiny_models(str(tmp_path / "again"))
    for name, path in models.items():
        assert _file_bytes(path) == _file_bytes(again[name]), name


def test_seed_changes_weights(tmp_path: Path) -> None:
    first = Path(build_tiny_qwen2_text(str(tmp_path / "a"), seed=0))
    second = Path(build_tiny_qwen2_text(str(tmp_path / "b"), seed=1))
    assert (first / "model.safetensors").read_bytes() != (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_second_build_is_a_noop(models: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(Path(models["captioner"]).parent)
    before = {name: _file_bytes(path) for name, path in models.items()}
    mtimes = {p: p.stat().st_mtime_ns for path in models.values() for p in Path(path).iterdir()}

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("rebuilt a complete model directory")

    for writer in ("_write_qwen25_vl", "_write_qwen3_vl", "_write_text"):
        monkeypatch.setattr(tm, writer, fail)
    assert build_tiny_models(root) == models
    assert {name: _file_bytes(path) for name, path in models.items()} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "captioner").mkdir()
    (tmp_path / "captioner" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_qwen25_vl(str(tmp_path / "captioner"))
    assert (tmp_path / "captioner" / "notes.txt").read_text() == "keep me"
