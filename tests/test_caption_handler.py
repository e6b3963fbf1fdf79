"""The caption handler: prompt rendering and generation on the real engine, fault isolation by injection."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from beam_captions.inference.caption_handler import QwenVLCaptionHandler, caption_batch, video_input
from beam_captions.prompts import CAPTION_PROMPTS, caption_prompt
from beam_captions.records import WindowRecord
from conftest import VLLM_KWARGS


def window(index: int, frames: int = 4, size: int = 56) -> WindowRecord:
    rng = np.random.default_rng(index)
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=index * 30,
        end_frame=index * 30 + 29, start_s=index * 1.0, end_s=index + 1.0, frame_indices=tuple(range(frames)),
        frames=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
    )


@pytest.fixture(scope="module")
def engine(captioner_dir):
    return QwenVLCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS).load_model()


@pytest.mark.parametrize("variant", sorted(CAPTION_PROMPTS) + ["custom"])
def test_prompt_is_rendered_with_the_models_chat_template(engine, variant):
    prompt = caption_prompt(variant, "Name every colour you see." if variant == "custom" else None)
    rendered = video_input(engine, window(0), prompt)["prompt"]
    assert rendered.startswith("<|im_start|>user\n")
    assert rendered.count("<|video_pad|>") == 1 and "<|vision_start|>" in rendered
    assert prompt in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_video_metadata_matches_the_frames(engine):
    frames, metadata = video_input(engine, window(1, frames=6), "x")["multi_modal_data"]["video"]
    assert frames.shape == (6, 56, 56, 3) and frames.dtype == np.uint8
    assert metadata["total_num_frames"] == 6 and metadata["frames_indices"] == list(range(6))
    assert metadata["do_sample_frames"] is False and metadata["fps"] == pytest.approx(6.0)


def test_real_engine_captions_and_stage2_sees_the_stage1_caption(engine, captioner_dir):
    handler = QwenVLCaptionHandler(
        captioner_dir, vllm_kwargs=VLLM_KWARGS, generate_stage2_caption=True,
        stage2_prompt_text="Refine this:\n", max_output_tokens=16,
    )
    seen: list[str] = []
    original = engine.generate

    def spy(inputs, params):
        seen.extend(i["prompt"] for i in inputs)
        return original(inputs, params)

    engine.generate = spy
    try:
        results = list(handler.run_inference([window(0), window(1)], engine))
    finally:
        del engine.generate
    assert [failure for _, failure in results] == [None, None]
    records = [record for record, _ in results]
    assert all(r.caption and r.caption_stage2 and r.frames is None for r in records)
    assert len(seen) == 4
    for record, stage2_prompt in zip(records, seen[2:]):
        assert f"Refine this:\n{record.caption}" in stage2_prompt


def test_one_failing_window_does_not_sink_its_batch():
    calls = []

    def flaky(engine, batch, request):
        calls.append([r.window_index for r in batch])
        if any(r.window_index == 2 for r in batch):
            raise RuntimeError("CUDA error: device-side assert")
        return [r.replace(frames=None, caption=f"caption {r.window_index}") for r in batch]

    handler = QwenVLCaptionHandler("unused", inference_fn=flaky)
    results = list(handler.run_inference([window(i) for i in range(4)], SimpleNamespace(name="m")))
    assert calls == [[0, 1, 2, 3], [0], [1], [2], [3]]
    assert [r.caption for r, _ in results] == ["caption 0", "caption 1", None, "caption 3"]
    failure = results[2][1]
    assert failure.stage == "caption" and failure.window_index == 2
    assert failure.error_type == "RuntimeError" and "device-side assert" in failure.message
    assert results[2][0].frames is None


def test_empty_caption_counts_as_a_failure(engine):
    empty = SimpleNamespace(outputs=[SimpleNamespace(text="   ")])
    broken = SimpleNamespace(name="m", generate=lambda inputs, params: [empty] * len(inputs), render_chat=engine.render_chat)
    handler = QwenVLCaptionHandler("unused")
    (record, failure), = handler.run_inference([window(0)], broken)
    assert record.caption is None and failure.error_type == "ValueError" and "empty caption" in failure.message


def test_batching_follows_the_batch_size_and_counts_frame_bytes():
    handler = QwenVLCaptionHandler("unused", caption_batch_size=3)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 3}
    assert handler.get_num_bytes([window(0), window(1)]) == 2 * 4 * 56 * 56 * 3
