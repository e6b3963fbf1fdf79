"""EnhanceCaptions: every captioned window, served to a text-only Qwen handler."""

from __future__ import annotations

from beam_captions.inference.enhance_handler import QwenTextEnhanceHandler
from beam_captions.transforms._inference import ModelStep

__all__ = ["EnhanceCaptions"]


class EnhanceCaptions(ModelStep):
    """Fill ``enhanced_caption`` of every captioned window (stage 2 when present, else stage 1).

    Example: ``captioned | EnhanceCaptions(model_dir="models/enhancer", model_variant="qwen3")``: keyword
    arguments build a ``QwenTextEnhanceHandler``, or pass one as ``handler``. Windows without a caption
    pass through untouched; a window whose enhancement fails keeps its captions and carries a ``Failure``.
    """

    handler_class = QwenTextEnhanceHandler
    label_of_step = "Enhance"
