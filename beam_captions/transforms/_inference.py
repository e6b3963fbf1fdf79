"""Serve windows to one of our model handlers: each window in flight as soon as it arrives.

Beam's ``RunInference`` hands a model one batch at a time and waits for the whole batch, so the
batch waits for its longest caption while the engine's finished slots sit idle, and nothing new
is sent meanwhile. Here every window is submitted to the engine as it arrives (the engine batches
requests from all threads continuously) and comes back as soon as it is done; a per-process bound
on windows in flight keeps frame memory flat and pushes back on the decode upstream.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.utils import multi_process_shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_captions.inference.vllm_handler import Outcome, VLLMWindowHandler
from beam_captions.metrics import count

__all__ = ["InferWindows", "ServeWindows"]


@dataclass
class _Slots:
    """Windows in flight in this process for one engine: a bound and the threads that wait on the engine."""

    free: threading.BoundedSemaphore
    pool: ThreadPoolExecutor


_slots: dict[str, _Slots] = {}
_slots_lock = threading.Lock()


def _digest(key: str) -> str:
    """A short, file-name-safe name for ``key`` (Beam's cross-process lock is a file named after the tag)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _slots_for(key: str, bound: int) -> _Slots:
    """One bound per engine (and bound) per process, shared by every DoFn instance (thread) of the process."""
    key = f"{key}:{bound}"
    with _slots_lock:
        if key not in _slots:
            _slots[key] = _Slots(threading.BoundedSemaphore(bound), ThreadPoolExecutor(bound, "serve-window"))
        return _slots[key]


class ServeWindows(beam.DoFn):
    """Every element through ``handler``: the windows it wants come back updated (+ ``Failure``) as
    they finish, the rest pass through at once.

    A window that fails gets a ``Failure`` of its own (the handler isolates it); an engine that
    cannot start fails the bundle. With ``share_model_across_processes`` the engine lives in one
    process per machine and the windows go to it through Beam's ``multi_process_shared`` proxy.
    """

    def __init__(self, handler: VLLMWindowHandler):
        self.handler = handler
        self._model: Any = None
        self._pending: list[tuple[Future, WindowedValue]] = []

    def setup(self) -> None:
        handler = self.handler
        if handler.share_model_across_processes():
            shared = multi_process_shared.MultiProcessShared(
                handler.load_model, tag=f"beam-captions-{_digest(handler.engine_key())}", always_proxy=True
            )
            self._model = shared.acquire()
        else:
            self._model = handler.load_model()
        self._slots = _slots_for(handler.engine_key(), handler.max_in_flight)

    def start_bundle(self) -> None:
        self._pending = []

    def _serve(self, window: Any) -> Outcome:
        if self.handler.share_model_across_processes():
            (outcome,) = self._model.outcomes([window])
        else:
            (outcome,) = self.handler.outcomes([window], self._model)
        return outcome

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if not self.handler.wants(element):
            yield element
        else:
            slots = self._slots
            slots.free.acquire()  # waits while this process already has ``max_in_flight`` windows out
            try:
                future = slots.pool.submit(self._serve, element)
            except BaseException:
                slots.free.release()
                raise
            future.add_done_callback(lambda _: slots.free.release())
            self._pending.append((future, WindowedValue(None, timestamp, (window,))))
        yield from self._finished(block=False)

    def finish_bundle(self):
        yield from self._finished(block=True)

    def _finished(self, block: bool) -> Iterator[WindowedValue]:
        """Outcomes of the windows that are done (all of them when ``block``), unpacked into elements."""
        if block and self._pending:
            wait([future for future, _ in self._pending])
        done, pending = [], []
        for item in self._pending:
            (done if item[0].done() else pending).append(item)
        self._pending = pending
        for future, windowed in done:
            record, failure = future.result()  # an engine that cannot start fails the bundle here
            count(self.handler.done_counter)
            yield windowed.with_value(record)
            if failure is not None:
                yield windowed.with_value(failure)


class InferWindows(beam.PTransform):
    """``ServeWindows`` as a step; ``accelerator`` is a resource hint on it (the GPU step)."""

    def __init__(self, handler: VLLMWindowHandler, accelerator: Optional[str] = None):
        super().__init__()
        self.handler = handler
        self.accelerator = accelerator

    def expand(self, elements):
        serve = beam.ParDo(ServeWindows(self.handler))
        if self.accelerator:
            serve = serve.with_resource_hints(accelerator=self.accelerator)
        return elements | "ServeModel" >> serve
