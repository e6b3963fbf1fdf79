"""Caption enhancement with the tiny text models and the real vLLM engine."""

from __future__ import annotations

from types import SimpleNamespace

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that
from transformers import AutoTokenizer

from beam_captions.inference.enhance_handler import EnhanceRequest, QwenTextEnhanceHandler, enhance_batch, enhance_input
from beam_captions.prompts import ENHANCE_PROMPTS, enhance_prompt
from beam_captions.records import Failure, WindowRecord
from beam_captions.transforms.enhance import EnhanceCaptions
from conftest import VLLM_KWARGS, spying_on, served

SENT: list[int] = []


def captioned(index: int, caption: str | None = "A red car turns left at a green light.", stage2: str | None = None):
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=0, end_frame=9, start_s=0.0,
        end_s=1.0, frame_indices=(0, 3, 6, 9), caption=caption, caption_stage2=stage2, caption_model="captioner",
    )


@pytest.fixture(scope="module")
def enhancer_dir(tiny_models):
    return tiny_models["enhancer"]


@pytest.fixture(scope="module")
def engine(enhancer_dir):
    return QwenTextEnhanceHandler(enhancer_dir, vllm_kwargs=VLLM_KWARGS).load_model().engine


@pytest.mark.parametrize("variant", sorted(ENHANCE_PROMPTS) + ["custom"])
def test_each_prompt_variant_reaches_the_engine(engine, enhancer_dir, variant):
    text = "Rewrite it with more colour." if variant == "custom" else None
    handler = QwenTextEnhanceHandler(
        enhancer_dir, vllm_kwargs=VLLM_KWARGS, prompt_variant="default" if text else variant, prompt_text=text,
        max_output_tokens=12,
    )
    with spying_on(engine) as calls:
        (record, failure), = served(handler, [captioned(0, stage2="Refined: a red car turns left.")], engine)
    seen = [i["prompt"] for inputs, _ in calls for i in inputs]
    assert failure is None and record.enhanced_caption and record.enhance_model == "enhancer"
    assert record.caption == "A red car turns left at a green light."  # the stage-1 caption is kept
    (prompt,) = seen
    assert prompt.startswith("<|im_start|>system\n" + enhance_prompt(variant if not text else "default", text))
    assert "<|im_start|>user\nRefined: a red car turns left.<|im_end|>" in prompt  # stage 2 is preferred
    assert prompt.endswith("<|im_start|>assistant\n")


def test_qwen3_prompt_turns_thinking_off(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["enhancer-qwen3"])
    renderer = SimpleNamespace(render_chat=lambda messages, **kw: tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kw))
    request = QwenTextEnhanceHandler(tiny_models["enhancer-qwen3"], model_variant="qwen3").request
    assert request.disable_thinking
    assert enhance_input(renderer, captioned(0), request)["prompt"].endswith("<think>\n\n</think>\n\n")
    plain = enhance_input(renderer, captioned(0), EnhanceRequest("x"))["prompt"]
    assert not plain.endswith("</think>\n\n")


def test_a_failing_batch_is_isolated_and_keeps_stage1_captions(engine, enhancer_dir):
    def flaky(eng, batch, request):
        if any(r.window_index == 1 for r in batch):
            raise MemoryError("KV cache exhausted")
        return enhance_batch(eng, batch, request)

    handler = QwenTextEnhanceHandler(enhancer_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=8, inference_fn=flaky)
    results = served(handler, [captioned(i) for i in range(3)], engine)
    assert [bool(r.enhanced_caption) for r, _ in results] == [True, False, True]
    record, failure = results[1]
    assert record.caption and failure.stage == "enhance" and failure.error_type == "MemoryError"
    assert results[0][1] is None and results[2][1] is None


def _spy(eng, batch, request):
    SENT.extend(r.window_index for r in batch)
    return enhance_batch(eng, batch, request)


def test_windows_without_a_caption_are_not_sent(enhancer_dir, engine):
    SENT.clear()
    failure = Failure("mem://clip.mp4", "clip", "caption", "ValueError", "empty caption", 1)
    handler = QwenTextEnhanceHandler(enhancer_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=8, inference_fn=_spy)

    def check(elements):
        by_index = {e.window_index: e for e in elements if isinstance(e, WindowRecord)}
        assert by_index[0].enhanced_caption and by_index[1].enhanced_caption is None
        assert by_index[1].enhance_model is None
        assert [e for e in elements if isinstance(e, Failure)] == [failure]

    with beam.Pipeline() as p:
        out = p | beam.Create([captioned(0), captioned(1, caption=None), failure]) | EnhanceCaptions(handler=handler)
        assert_that(out, check)
    assert SENT == [0]
