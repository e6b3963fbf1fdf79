"""RunInference with one of our window handlers, unpacked back into records and failures."""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from beam_captions.inference.vllm_handler import VLLMWindowHandler
from beam_captions.metrics import count

__all__ = ["InferWindows"]


def _unpack(outcome, counter: str):
    record, failure = outcome
    count(counter)
    yield record
    if failure is not None:
        yield failure


class InferWindows(beam.PTransform):
    """``WindowRecord`` -> updated ``WindowRecord`` (+ ``Failure``); ``accelerator`` is a resource hint."""

    def __init__(self, handler: VLLMWindowHandler, accelerator: Optional[str] = None):
        super().__init__()
        self.handler = handler
        self.accelerator = accelerator

    def expand(self, windows):
        inference = RunInference(self.handler)
        if self.accelerator:
            inference = inference.with_resource_hints(accelerator=self.accelerator)
        return windows | "RunInference" >> inference | "Unpack" >> beam.FlatMap(_unpack, self.handler.done_counter)
