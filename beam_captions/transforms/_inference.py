"""RunInference with one of our window handlers, unpacked back into records and failures."""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from beam_captions.inference.vllm_handler import VLLMWindowHandler

__all__ = ["InferWindows"]


def _unpack(outcome):
    record, failure = outcome
    yield record
    if failure is not None:
        yield failure


class InferWindows(beam.PTransform):
    """Every element through the handler: the windows it wants come back updated (+ ``Failure``),
    the rest unchanged. ``accelerator`` is a resource hint on the inference step.

    The stream is not split and merged around the model (Partition/Flatten): Beam's streaming
    FnApiRunner in 2.77 stops delivering after such a Flatten, and one pass is simpler anyway.
    """

    def __init__(self, handler: VLLMWindowHandler, accelerator: Optional[str] = None):
        super().__init__()
        self.handler = handler
        self.accelerator = accelerator

    def expand(self, windows):
        inference = RunInference(self.handler)
        if self.accelerator:
            inference = inference.with_resource_hints(accelerator=self.accelerator)
        return windows | "RunInference" >> inference | "Unpack" >> beam.FlatMap(_unpack)
