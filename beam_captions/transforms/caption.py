"""CaptionWindows: the video caption handler (Qwen-VL or Nemotron) served every window that carries frames (``ServeWindows``)."""

from __future__ import annotations

from typing import Optional

import apache_beam as beam

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.transforms._inference import InferWindows

__all__ = ["CaptionWindows"]


class CaptionWindows(beam.PTransform):
    """Fill ``caption`` (and ``caption_stage2``) of every ``WindowRecord``; other elements pass through.

    Example: ``windows | CaptionWindows(model_dir="models/captioner", caption_batch_size=8)``.
    A window whose caption fails keeps its row without a caption and gains a ``Failure``.
    ``accelerator`` (e.g. ``"type:nvidia-l4;count:1;install-nvidia-driver"``) is a Beam resource hint
    on the inference step only, so runners that right-fit (Dataflow) give GPUs to this step alone.
    """

    def __init__(
        self,
        *,
        model_dir: Optional[str] = None,
        model_variant: str = "qwen2.5",
        prompt_variant: str = "default",
        prompt_text: Optional[str] = None,
        caption_batch_size: int = 64,
        max_output_tokens: int = 512,
        fp8: bool = False,
        disable_mmcache: bool = True,
        generate_stage2_caption: bool = False,
        stage2_prompt_text: Optional[str] = None,
        retry_flagged: bool = False,
        dtype: str = "auto",
        frames_dtype: str = "uint8",
        gpu_memory_utilization: float = 0.85,
        vllm_kwargs: Optional[dict] = None,
        trust_remote_code: bool = False,
        accelerator: Optional[str] = None,
        share_across_processes: bool = False,
        handler: Optional[VideoCaptionHandler] = None,
        verbose: bool = False,
        **reference_names,
    ):
        super().__init__()
        # The reference's CaptionGenerationStage / CaptionPreparationStage names, where ours differ.
        caption_batch_size = reference_names.pop("model_batch_size", caption_batch_size)
        frames_dtype = reference_names.pop("preprocess_dtype", frames_dtype)
        _refuse_unknown("CaptionWindows", reference_names)
        self.verbose = verbose
        self.accelerator = accelerator
        if handler is None and not model_dir:
            raise ValueError("CaptionWindows needs model_dir (or a handler)")
        self.handler = handler or VideoCaptionHandler(
            model_dir,
            model_variant=model_variant,
            prompt_variant=prompt_variant,
            prompt_text=prompt_text,
            caption_batch_size=caption_batch_size,
            max_output_tokens=max_output_tokens,
            fp8=fp8,
            disable_mmcache=disable_mmcache,
            generate_stage2_caption=generate_stage2_caption,
            stage2_prompt_text=stage2_prompt_text,
            retry_flagged=retry_flagged,
            dtype=dtype,
            frames_dtype=frames_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            vllm_kwargs=vllm_kwargs,
            trust_remote_code=trust_remote_code,
            share_across_processes=share_across_processes,
        )

    def expand(self, pcoll):
        return pcoll | "Caption" >> InferWindows(self.handler, self.accelerator)


def _refuse_unknown(name: str, extra: dict) -> None:
    if extra:
        raise TypeError(f"{name}() got unexpected keyword arguments: {', '.join(sorted(extra))}")
