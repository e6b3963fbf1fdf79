"""EnhanceCaptions: a text-only Qwen handler served every captioned window (``ServeWindows``)."""

from __future__ import annotations

from typing import Optional

import apache_beam as beam

from beam_captions.inference.enhance_handler import QwenTextEnhanceHandler
from beam_captions.transforms._inference import InferWindows

__all__ = ["EnhanceCaptions"]


class EnhanceCaptions(beam.PTransform):
    """Fill ``enhanced_caption`` of every captioned window (stage 2 when present, else stage 1).

    Example: ``captioned | EnhanceCaptions(model_dir="models/enhancer", model_variant="qwen3")``.
    Windows without a caption pass through untouched with their failure records.
    """

    def __init__(
        self,
        *,
        model_dir: Optional[str] = None,
        model_variant: str = "qwen2.5",
        prompt_variant: str = "default",
        prompt_text: Optional[str] = None,
        batch_size: int = 128,
        max_output_tokens: int = 512,
        fp8: bool = False,
        gpu_memory_utilization: float = 0.55,
        vllm_kwargs: Optional[dict] = None,
        trust_remote_code: bool = False,
        accelerator: Optional[str] = None,
        share_across_processes: bool = False,
        handler: Optional[QwenTextEnhanceHandler] = None,
        verbose: bool = False,
        model_batch_size: Optional[int] = None,
    ):
        super().__init__()
        if model_batch_size is not None:  # the reference's EnhanceCaptionStage name
            batch_size = model_batch_size
        self.verbose = verbose
        self.accelerator = accelerator
        if handler is None and not model_dir:
            raise ValueError("EnhanceCaptions needs model_dir (or a handler)")
        self.handler = handler or QwenTextEnhanceHandler(
            model_dir,
            model_variant=model_variant,
            prompt_variant=prompt_variant,
            prompt_text=prompt_text,
            batch_size=batch_size,
            max_output_tokens=max_output_tokens,
            fp8=fp8,
            gpu_memory_utilization=gpu_memory_utilization,
            vllm_kwargs=vllm_kwargs,
            trust_remote_code=trust_remote_code,
            share_across_processes=share_across_processes,
        )

    def expand(self, pcoll):
        return pcoll | "Enhance" >> InferWindows(self.handler, self.accelerator)
