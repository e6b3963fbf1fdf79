"""A caption that is all reasoning (Nemotron 3 Nano Omni answers so at times, its reasoning turned off): flagged
``reasoning_only``, generated once more for a reasoning family whatever ``retry_flagged`` says, then kept (the
retry answered) or recorded as the window's ``caption`` failure. A stand-in engine answers that way."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.records import WindowRecord

CAPTION = "A red car drives left past a bus stop."
REASONING_ONLY = {
    "closed": "<think>The frames show a red car moving left, and a bus stop.</think>",
    "cut-off": "<think>The frames show a red car moving left, and a bus stop. It",
    "opened-by-the-template": "The frames show a red car moving left, and a bus stop.</think>\n",
}


class AnsweringEngine:
    """An engine that answers its n-th request with ``answers[n]`` (the last one from then on)."""

    name = "stand-in"

    def __init__(self, *answers: str):
        self.answers = answers
        self.calls: list = []  # (rendered prompt, sampling params) of each request

    def render_chat(self, messages: list[dict], **template_kwargs) -> str:
        return f"{messages}{template_kwargs}"

    def generate(self, inputs: list[dict], params) -> list:
        outputs = []
        for given in inputs:
            text = self.answers[min(len(self.calls), len(self.answers) - 1)]
            self.calls.append((given["prompt"], params))
            completion = SimpleNamespace(text=text, token_ids=[0] * 24, finish_reason="stop")
            outputs.append(SimpleNamespace(outputs=[completion], prompt_token_ids=[0] * 64))
        return outputs


def window() -> WindowRecord:
    return WindowRecord(clip_id="clip", source="mem://clip.mp4", window_index=0, start_frame=0, end_frame=29,
                        start_s=0.0, end_s=1.0, frame_indices=(0, 10, 20, 29),
                        frames=np.zeros((4, 32, 32, 3), dtype=np.uint8))


def omni(**settings) -> VideoCaptionHandler:
    return VideoCaptionHandler("unused-omni", model_variant="nemotron-3-nano-omni", **settings)


def served(handler: VideoCaptionHandler, engine: AnsweringEngine) -> tuple:
    """A window's outcome through the handler (``infer_window``, as the serving step calls it), and its failure."""
    outcome = handler.infer_window(engine, window())
    return outcome, outcome.failures[-1] if outcome.failures else None


@pytest.mark.parametrize("form", list(REASONING_ONLY))
def test_an_answer_that_is_all_reasoning_is_retried_once_and_the_retry_s_caption_kept(form):
    engine = AnsweringEngine(REASONING_ONLY[form], CAPTION)
    outcome, failure = served(omni(), engine)
    assert failure is None and outcome.caption == CAPTION and outcome.caption_retried
    assert outcome.caption_check.flags == ()
    (_, first), (prompt, again) = engine.calls
    assert "enable_thinking" in prompt and first.seed is None and again.seed == 1  # the retry's own sampling


def test_reasoning_twice_is_a_caption_failure_flagged_reasoning_only_and_not_tried_a_third_time():
    engine = AnsweringEngine(REASONING_ONLY["closed"])
    outcome, failure = served(omni(), engine)
    assert len(engine.calls) == 2
    assert outcome.caption == "" and outcome.caption_retried
    assert outcome.caption_check.flags == ("empty", "reasoning_only")
    assert failure.stage == "caption" and failure.window_index == 0
    assert failure.message == "the model wrote reasoning and no caption, twice (retried once)"
    assert "<think>" not in failure.message and "red car" not in (outcome.caption or "")


def test_an_empty_answer_without_reasoning_is_not_reasoning_only_and_not_retried_unasked():
    engine = AnsweringEngine("<think></think>\n")
    outcome, failure = served(omni(), engine)
    assert len(engine.calls) == 1 and not outcome.caption_retried
    assert outcome.caption_check.flags == ("empty",)
    assert failure.message == "the model returned an empty caption"


def test_a_family_that_does_not_reason_is_flagged_but_retried_only_when_asked():
    """Qwen2.5-VL does not reason: the flag is kept, the retry is ``--captioning-retry-flagged``'s."""
    engine = AnsweringEngine(REASONING_ONLY["closed"], CAPTION)
    outcome, failure = served(VideoCaptionHandler("unused-qwen"), engine)
    assert len(engine.calls) == 1 and outcome.caption_check.flags == ("empty", "reasoning_only")
    assert failure.message == "the model wrote reasoning and no caption, once"
    engine = AnsweringEngine(REASONING_ONLY["closed"], CAPTION)
    outcome, failure = served(VideoCaptionHandler("unused-qwen", retry_flagged=True), engine)
    assert failure is None and outcome.caption == CAPTION and len(engine.calls) == 2


def test_the_handler_allows_for_the_retry_in_its_time_limits():
    assert omni().generate_calls == 2 and VideoCaptionHandler("unused-qwen").generate_calls == 1
