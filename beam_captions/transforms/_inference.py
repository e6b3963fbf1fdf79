"""Serve windows to a window handler's model: each window in flight as soon as it arrives.

Beam's ``RunInference`` hands a model one batch at a time and waits for the whole batch, so the
batch waits for its longest caption while the engine's finished slots sit idle, and nothing new
is sent meanwhile. Here every window is submitted to the engine as it arrives (the engine batches
requests from all threads continuously) and comes back as soon as it is done. The handler's model,
a ``WindowServer``, bounds the windows in flight per engine, which keeps frame memory flat and
pushes back on the decode upstream.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.utils import multi_process_shared, shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_captions.inference.engine import EngineClosed
from beam_captions.inference.serving import serve_async, serve_pool
from beam_captions.inference.vllm_handler import VLLMWindowHandler

__all__ = ["InferWindows", "ModelStep", "ServeWindows"]


def _digest(key: str) -> str:
    """A short, file-name-safe name for ``key`` (Beam's cross-process lock is a file named after the tag)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


_machine_servers: dict[str, Any] = {}
_machine_servers_lock = threading.Lock()


def machine_server(handler: VLLMWindowHandler) -> Any:
    """This process's proxy of the machine's one server for ``handler`` (Beam's ``multi_process_shared``),
    acquired once and kept for the life of the process.

    A proxy that becomes garbage is released by a finalizer that connects to the server. In the process that
    hosts the server, the garbage collector may run that finalizer on the server's own accepting thread, which
    then waits for itself: no process of the machine can reach the engine again. A ``ServeWindows`` of a
    failed bundle is such garbage (its exception's traceback holds it in a cycle); tests/test_caption_routing.py
    hung that way twice in 15 runs before proxies were kept. A kept proxy whose server is gone (its process
    died) is replaced: Beam then starts the server again, here.
    """
    tag = f"beam-captions-{_digest(handler.server_key())}"
    with _machine_servers_lock:
        server = _machine_servers.get(tag)
        if server is not None:
            try:
                server.held()
                return server
            except (OSError, EOFError):  # the server's process is gone (a finalizer for it is harmless)
                pass
        server = multi_process_shared.MultiProcessShared(handler.load_model, tag=tag, always_proxy=True).acquire()
        _machine_servers[tag] = server
        return server


class ServeWindows(beam.DoFn):
    """Every element through ``handler``: the windows it wants come back as their outcomes (one element
    each: filled in, or carrying a ``Failure``) as they finish; the rest pass through at once.

    The handler's model (a ``WindowServer``) is shared by every thread of the process (Beam's
    ``shared.Shared``) or, with ``share_model_across_processes``, by every process of the machine
    (``multi_process_shared``). An engine that cannot start fails the bundle at once (the windows
    still queued are cancelled), and the runner's retry of the bundle tries one more start; with
    ``record_start_failures`` (a local run, which has no retries) the start is tried once per run and
    every window gets the start's failure instead, so its clip is recorded as failed. A bundle whose
    windows are not all back after ``bundle_timeout_s`` fails (the handler's longest legitimate window:
    every window pending at the bundle's end is being served by then).
    """

    def __init__(self, handler: VLLMWindowHandler, record_start_failures: bool = False):
        self.handler = handler
        self.record_start_failures = record_start_failures
        self._shared_handle = shared.Shared()
        self._server: Any = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: list[tuple[Future, Any, WindowedValue]] = []

    @property
    def bundle_timeout_s(self) -> Optional[float]:
        return self.handler.window_time_limit_s()

    def setup(self) -> None:
        handler = self.handler
        if handler.share_model_across_processes():
            self._server = machine_server(handler)
        else:
            self._server = self._shared_handle.acquire(handler.load_model, tag=handler.server_key())
        self._pool = serve_pool(handler.server_key(), handler.batch_size)

    def teardown(self) -> None:
        self._abandon()  # the pool is the process's: only this instance's queued windows go

    def start_bundle(self) -> None:
        self._pending = []
        if not self.record_start_failures:
            self._server.allow_start()  # a runner's retry of a bundle whose engine could not start tries again

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if not self.handler.wants(element):
            yield element
        else:
            future = serve_async(self._server, element, self._pool)  # waits while the engine's bound is full
            self._pending.append((future, element, WindowedValue(None, timestamp, (window,))))
        yield from self._finished(block=False)

    def finish_bundle(self):
        yield from self._finished(block=True)

    def _finished(self, block: bool) -> Iterator[WindowedValue]:
        """Outcomes of the windows that are done (all of them when ``block``)."""
        if block and self._pending:
            futures = [future for future, _, _ in self._pending]
            _, not_done = wait(futures, timeout=self.bundle_timeout_s,
                               return_when=ALL_COMPLETED if self.record_start_failures else FIRST_EXCEPTION)
            if not_done and not any(f.done() and f.exception() for f in futures):
                self._abandon()
                raise TimeoutError(f"{len(not_done)} windows were not back from the {self.handler.stage} engine "
                                   f"after {self.bundle_timeout_s:g} s")
        done, pending = [], []
        for item in self._pending:
            (done if item[0].done() else pending).append(item)
        self._pending = pending
        for future, element, windowed in done:
            error = future.exception()
            if error is None:
                outcome = future.result()
            elif self.record_start_failures and not isinstance(error, EngineClosed):
                outcome = self.handler.failed(element, error)  # the engine could not start: the window failed
            else:  # fail the bundle, drop the queue
                self._abandon()
                raise error
            self.handler.count_outcome(element, outcome)
            yield windowed.with_value(outcome)

    def _abandon(self) -> None:
        """Cancel the windows still queued and give their places back (those being served finish on their own)."""
        for future, _, _ in self._pending:
            if future.cancel():
                self._server.release(future.ticket)
        self._pending = []


class InferWindows(beam.PTransform):
    """``ServeWindows`` as a step; ``accelerator`` is a resource hint on it (the GPU step)."""

    def __init__(self, handler: VLLMWindowHandler, accelerator: Optional[str] = None,
                 record_start_failures: bool = False):
        super().__init__()
        self.handler = handler
        self.accelerator = accelerator
        self.record_start_failures = record_start_failures

    def expand(self, elements):
        serve = beam.ParDo(ServeWindows(self.handler, self.record_start_failures))
        if self.accelerator:
            serve = serve.with_resource_hints(accelerator=self.accelerator)
        return elements | "ServeModel" >> serve


class ModelStep(beam.PTransform):
    """A model stage: a ``handler_class`` handler (given, or built from keyword settings) served every
    window it wants; ``accelerator`` is the GPU resource hint of the serving step; ``record_start_failures``
    (local runs) turns an engine that cannot start into a failure of each window (see ``ServeWindows``)."""

    handler_class: type = VLLMWindowHandler
    label_of_step = "Serve"

    def __init__(self, handler: Optional[VLLMWindowHandler] = None, *, accelerator: Optional[str] = None,
                 record_start_failures: bool = False, **handler_settings: Any):
        super().__init__()
        name = type(self).__name__
        if handler is None:
            self.handler_class.refuse_unknown(handler_settings, name)
            model_dir = handler_settings.pop("model_dir", None)
            if not model_dir:
                raise ValueError(f"{name} needs model_dir (or a handler)")
            handler = self.handler_class(model_dir, **handler_settings)
        elif handler_settings:
            raise TypeError(f"{name} takes a handler or its settings, not both: {', '.join(sorted(handler_settings))}")
        self.handler = handler
        self.accelerator = accelerator
        self.record_start_failures = record_start_failures

    def expand(self, pcoll):
        return pcoll | self.label_of_step >> InferWindows(self.handler, self.accelerator, self.record_start_failures)
