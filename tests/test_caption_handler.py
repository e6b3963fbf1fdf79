"""The caption handler: prompt rendering and generation on the real engine, fault isolation by injection."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input
from beam_captions.inference.engine import release_engines
from beam_captions.inference.frame_bounds import model_frame_bounds
from beam_captions.prompts import CAPTION_PROMPTS, caption_prompt
from beam_captions.records import WindowRecord
from conftest import VLLM_KWARGS, spying_on, served


def window(index: int, frames: int = 4, size: int = 56) -> WindowRecord:
    rng = np.random.default_rng(index)
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=index * 30,
        end_frame=index * 30 + 29, start_s=index * 1.0, end_s=index + 1.0, frame_indices=tuple(range(frames)),
        frames=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
    )


@pytest.fixture(scope="module")
def engine(captioner_dir):
    return VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS).load_model().engine


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
    handler = VideoCaptionHandler(
        captioner_dir, vllm_kwargs=VLLM_KWARGS, generate_stage2_caption=True,
        stage2_prompt_text="Refine this:\n", max_output_tokens=16,
    )
    with spying_on(engine) as calls:
        results = served(handler, [window(0), window(1)], engine)
    seen = [i["prompt"] for inputs, _ in calls for i in inputs]
    assert [failure for _, failure in results] == [None, None]
    records = [record for record, _ in results]
    assert all(r.caption and r.caption_stage2 and r.frames is None for r in records)
    assert len(seen) == 4
    stage2_prompts = [prompt for prompt in seen if "Refine this:" in prompt]
    assert len(stage2_prompts) == 2
    for record in records:
        assert any(f"Refine this:\n{record.caption}" in prompt for prompt in stage2_prompts)


def test_one_failing_window_does_not_sink_its_batch():
    calls = []

    def flaky(engine, batch, request):
        calls.append([r.window_index for r in batch])
        if any(r.window_index == 2 for r in batch):
            raise RuntimeError("CUDA error: device-side assert")
        return [r.replace(frames=None, caption=f"caption {r.window_index}") for r in batch]

    handler = VideoCaptionHandler("unused", inference_fn=flaky)
    results = served(handler, [window(i) for i in range(4)], SimpleNamespace(name="m", start=lambda: None, allow_start=lambda: None))
    assert sorted(calls) == [[0], [1], [2], [3]]  # each window is its own request
    assert [r.caption for r, _ in results] == ["caption 0", "caption 1", None, "caption 3"]
    failure = results[2][1]
    assert failure.stage == "caption" and failure.window_index == 2
    assert failure.error_type == "RuntimeError" and "device-side assert" in failure.message
    assert results[2][0].frames is None


def test_empty_caption_is_kept_flagged_and_recorded_as_a_failure(engine):
    blank = SimpleNamespace(
        prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(text="   ", token_ids=[7], finish_reason="stop")]
    )
    broken = SimpleNamespace(name="m", start=lambda: None, allow_start=lambda: None, render_chat=engine.render_chat,
                             generate=lambda inputs, params: [blank] * len(inputs))
    (record, failure), = served(VideoCaptionHandler("unused"), [window(0)], broken)
    assert record.caption == "" and record.caption_check.flags == ("empty",)
    assert record.caption_prompt_tokens == 3
    assert failure.stage == "caption" and "empty caption" in failure.message


def test_finish_reason_and_token_count_come_from_the_engine(engine, captioner_dir):
    handler = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=6)
    (record, failure), = served(handler, [window(3)], engine)
    assert failure is None
    check = record.caption_check
    assert check.finish_reason == "length" and check.num_tokens == 6 and "truncated" in check.flags
    text = video_input(engine, window(3), caption_prompt("default"))["prompt"]
    video_tokens = 2 * (56 // 28) ** 2  # 4 frames of 56x56: 2 frame pairs of 2x2 merged patches
    assert record.caption_prompt_tokens == len(engine.tokenizer.encode(text)) - 1 + video_tokens
    long = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=40)
    (record, _), = served(long, [window(3)], engine)
    assert record.caption_check.num_tokens == 40 and len(record.caption) > 0


def test_retry_flagged_generates_again_with_new_seed_and_penalty(engine, captioner_dir):
    handler = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=6, retry_flagged=True)
    with spying_on(engine) as calls:
        results = served(handler, [window(0), window(1)], engine)
    # every tiny-model caption hits the limit, so each window is retried (each window is its own request)
    assert sorted((len(i), p.seed or 0, p.repetition_penalty) for i, p in calls) == [(1, 0, 1.05)] * 2 + [(1, 1, 1.3)] * 2
    assert all(record.caption_retried and record.caption for record, _ in results)
    plain = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=6)
    assert not any(record.caption_retried for record, _ in served(plain, [window(0)], engine))


def test_batching_follows_the_batch_size_and_counts_frame_bytes():
    handler = VideoCaptionHandler("unused", caption_batch_size=3)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 3, "max_batch_size": 3}
    assert handler.get_num_bytes([window(0), window(1)]) == 2 * 4 * 56 * 56 * 3


def test_qwen3_vl_goes_through_the_same_handler(tiny_models):
    qwen3_dir = tiny_models["captioner-qwen3"]
    assert model_frame_bounds(qwen3_dir, "qwen3").pixels(4) == (32 * 32 * 32 // 4,) * 2  # its clip bound, shared
    handler = VideoCaptionHandler(qwen3_dir, model_variant="qwen3", vllm_kwargs=VLLM_KWARGS, max_output_tokens=12)
    engine = handler.load_model().engine
    try:
        results = served(handler, [window(0, size=64), window(1, frames=6, size=64)], engine)
    finally:
        release_engines(engine)
    assert [failure for _, failure in results] == [None, None]
    assert all(record.caption and record.caption_model == "captioner-qwen3" for record, _ in results)


def test_a_dead_engine_is_started_again_and_the_window_retried():
    from vllm.v1.engine.exceptions import EngineDeadError

    state = {"alive": False, "restarts": 0}

    def fragile(engine, batch, request):
        if not state["alive"]:
            raise EngineDeadError()
        return [r.replace(frames=None, caption="back") for r in batch]

    def restart(generation=None):
        state["alive"], state["restarts"] = True, state["restarts"] + 1

    engine = SimpleNamespace(name="m", start=lambda: None, allow_start=lambda: None, restart=restart)
    results = served(VideoCaptionHandler("unused", inference_fn=fragile), [window(0)], engine)
    assert state["restarts"] == 1 and [(r.caption, f) for r, f in results] == [("back", None)]
