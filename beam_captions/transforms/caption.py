"""CaptionWindows: every window that carries frames, served to the video caption handler (Qwen-VL or Nemotron)."""

from __future__ import annotations

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.transforms._inference import ModelStep

__all__ = ["CaptionWindows"]


class CaptionWindows(ModelStep):
    """Fill ``caption`` (and ``caption_stage2``) of every ``WindowRecord``; other elements pass through.

    Example: ``windows | CaptionWindows(model_dir="models/captioner", caption_batch_size=8)``: keyword
    arguments build a ``VideoCaptionHandler`` (see it for each setting), or pass one as ``handler``.
    A window whose caption fails keeps its row without a caption and carries a ``Failure``.
    ``accelerator`` (e.g. ``"type:nvidia-l4;count:1;install-nvidia-driver"``) is a Beam resource hint
    on the inference step only, so runners that right-fit (Dataflow) give GPUs to this step alone.
    """

    handler_class = VideoCaptionHandler
    label_of_step = "Caption"
