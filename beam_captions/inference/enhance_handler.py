"""A Beam ``ModelHandler`` that rewrites window captions with a text-only Qwen model on vLLM.

Example::

    handler = QwenTextEnhanceHandler(model_dir="models/enhancer", model_variant="qwen3")
    outcomes = captioned | RunInference(handler)   # one WindowRecord per window: enhanced, or carrying its Failure
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from beam_captions.inference.caption_handler import generate_checked
from beam_captions.inference.engine import Engine, EngineSettings
from beam_captions.inference.variants import ENHANCE_MODELS, canonical_variant
from beam_captions.inference.vllm_handler import DEFAULT_REQUEST_TIMEOUT_S, VLLMWindowHandler
from beam_captions.prompts import enhance_prompt
from beam_captions.records import WindowRecord

__all__ = ["EnhanceRequest", "QwenTextEnhanceHandler", "enhance_batch", "enhance_input", "source_caption"]


@dataclass(frozen=True)
class EnhanceRequest:
    """The system instruction and sampling of the enhancer."""

    instruction: str
    max_output_tokens: int = 512
    disable_thinking: bool = False
    temperature: float = 0.1
    top_p: float = 0.001
    repetition_penalty: float = 1.05

    def sampling_params(self) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_output_tokens,
        )


def source_caption(record: WindowRecord) -> Optional[str]:
    """The caption to enhance: stage 2 when present, else stage 1."""
    return record.caption_stage2 or record.caption or None


def enhance_input(engine: Engine, record: WindowRecord, request: EnhanceRequest) -> dict:
    """A vLLM input dict: system = the instruction, user = the window's caption (Qwen3 thinking off)."""
    caption = source_caption(record)
    if not caption:
        raise ValueError(f"window {record.window_index} of {record.source} has no caption to enhance")
    messages = [{"role": "system", "content": request.instruction}, {"role": "user", "content": caption}]
    template_kwargs = {"enable_thinking": False} if request.disable_thinking else {}
    return {"prompt": engine.render_chat(messages, **template_kwargs)}


def enhance_batch(engine: Engine, batch: Sequence[WindowRecord], request: EnhanceRequest) -> list[WindowRecord]:
    """Enhance the caption of every window in ``batch``; raises on engine errors."""
    outputs = generate_checked(engine, [enhance_input(engine, r, request) for r in batch], request.sampling_params())
    return [
        record.replace(enhanced_caption=out.text, enhanced_caption_check=out.check, enhance_model=engine.name)
        for record, out in zip(batch, outputs)
    ]


class QwenTextEnhanceHandler(VLLMWindowHandler):
    """Fills ``enhanced_caption`` of captioned windows; a failed window keeps its captions and carries a ``Failure``.

    ``batch_size`` (the reference's ``model_batch_size``, also accepted) is the captions in flight to the engine.
    """

    stage = "enhance"
    done_counter = "windows_enhanced"
    reference_names = frozenset({"model_batch_size", "verbose"})

    def __init__(
        self,
        model_dir: str,
        *,
        model_variant: str = "qwen2.5",
        prompt_variant: str = "default",
        prompt_text: Optional[str] = None,
        batch_size: int = 128,
        max_output_tokens: int = 512,
        fp8: bool = False,
        dtype: str = "auto",
        max_model_len: int = 32768,
        gpu_memory_utilization: float = 0.55,
        vllm_kwargs: Optional[dict] = None,
        trust_remote_code: bool = False,
        share_across_processes: bool = False,
        request_timeout_s: Optional[float] = DEFAULT_REQUEST_TIMEOUT_S,
        inference_fn: Callable[[Engine, Sequence[WindowRecord], EnhanceRequest], list[WindowRecord]] = enhance_batch,
        **reference_names: Any,
    ):
        self.refuse_unknown(reference_names)
        batch_size = reference_names.pop("model_batch_size", batch_size)  # the reference's EnhanceCaptionStage name
        self.verbose = bool(reference_names.pop("verbose", False))
        settings = EngineSettings(
            model_dir=model_dir,
            fp8=fp8,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            hub_model_id=ENHANCE_MODELS[canonical_variant(model_variant)],
            multimodal=False,
            extra=dict(vllm_kwargs or {}),
        )
        request = EnhanceRequest(
            instruction=enhance_prompt(prompt_variant, prompt_text),
            max_output_tokens=max_output_tokens,
            disable_thinking=canonical_variant(model_variant) == "qwen3",
        )
        super().__init__(settings, request, inference_fn, batch_size=batch_size,
                         share_across_processes=share_across_processes, request_timeout_s=request_timeout_s)

    def wants(self, element: object) -> bool:
        return isinstance(element, WindowRecord) and bool(source_caption(element))

    def check(self, record: WindowRecord) -> Optional[Exception]:
        return None if record.enhanced_caption else ValueError("the enhancer returned an empty caption")
