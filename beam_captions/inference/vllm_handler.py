"""What the caption and enhancement handlers share: one vLLM engine, one request and one outcome per window."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler

from beam_captions.inference.engine import (
    Engine, EngineDied, EngineSettings, EngineStartError, engine_key, is_engine_dead, load_engine,
)
from beam_captions.inference.serving import WindowServer, give_large_buffers_back, serve_async, serve_pool
from beam_captions.limits import MAX_SECONDS
from beam_captions.metrics import count
from beam_captions.records import WindowRecord, failure_from_exception

__all__ = ["ATTEMPTS", "DEFAULT_REQUEST_TIMEOUT_S", "ENGINE_STARTS_S", "VLLMWindowHandler"]

log = logging.getLogger(__name__)

InferenceFn = Callable[[Engine, Sequence[WindowRecord], Any], list[WindowRecord]]
DEFAULT_REQUEST_TIMEOUT_S = 1800.0
ATTEMPTS = 2  # a window whose engine died, hung or was replaced under it is tried once more
ENGINE_STARTS_S = 900.0
"""What a window may wait on engine starts besides its requests: the engine's load and one restart (a real
vLLM start takes 10 to 120 s, and the first one may fetch the weights), then ``Engine.START_BACKOFF_MAX_S``."""


class VLLMWindowHandler(ModelHandler[WindowRecord, WindowRecord, WindowServer]):
    """Runs ``inference_fn(engine, [window], request)`` on each ``WindowRecord`` this handler ``wants``.

    Its model is a ``WindowServer``: the engine with at most ``batch_size`` windows in flight to it
    (vLLM batches them continuously). Each window is its own request and comes back as one element,
    its outcome: the window filled in, or unchanged but for ``on_failure`` and carrying a ``Failure``
    of this handler's ``stage`` (``WindowRecord.failures``). An engine that died, hung past
    ``request_timeout_s`` or was replaced under a request is started again (once per death, however
    many threads saw it) and the window tried once more. An engine that cannot start raises
    ``EngineStartError`` (the bundle fails and is retried by the runner).

    With Beam's ``RunInference`` the other elements of a batch pass through unchanged, so the handler
    sits on the pipeline's one mixed PCollection; ``ServeWindows`` serves each window as it arrives.
    """

    stage = "inference"
    done_counter = "windows_inferred"
    reference_names: frozenset[str] = frozenset()  # the reference's setting names its ``**`` takes besides ours

    def __init__(
        self,
        settings: EngineSettings,
        request: Any,
        inference_fn: InferenceFn,
        *,
        batch_size: int,
        share_across_processes: bool = False,
        request_timeout_s: Optional[float] = DEFAULT_REQUEST_TIMEOUT_S,
    ):
        if request_timeout_s is not None and not 0 < request_timeout_s <= MAX_SECONDS:  # NaN included
            raise ValueError(f"request_timeout_s must be positive and at most {MAX_SECONDS} s, got {request_timeout_s}")
        # Beam's switch for one model per machine shared by its processes, behind a proxy.
        super().__init__(large_model=share_across_processes)
        self.settings = settings
        self.request = request
        self.batch_size = batch_size
        self.request_timeout_s = request_timeout_s
        self._inference_fn = inference_fn

    @classmethod
    def refuse_unknown(cls, settings: Iterable[str], caller: Optional[str] = None) -> None:
        """A ``TypeError`` worded as Python's for the first of ``settings`` this handler does not take
        (``caller``: the class named in it, the handler's by default)."""
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        known = cls.reference_names | {p.name for p in inspect.signature(cls).parameters.values() if p.kind in named}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"{caller or cls.__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")

    def load_model(self) -> WindowServer:
        """The engine (started on first use) behind a server that holds ``batch_size`` windows in flight."""
        engine = load_engine(self.settings, self.request_timeout_s)
        if self.share_model_across_processes():  # this process receives every process's windows
            give_large_buffers_back()
        return WindowServer(self, engine, self.batch_size, lease_s=self.window_time_limit_s())

    @property
    def generate_calls(self) -> int:
        """The most generate calls one attempt at a window makes (each waits up to the request timeout)."""
        return 1

    def window_time_limit_s(self) -> Optional[float]:
        """The longest a window may legitimately take to serve (None: no request timeout, no limit): every
        generate call of every attempt at the request timeout, and the engine starts it may wait on. Its place
        on the engine and its bundle's wait last this long."""
        if self.request_timeout_s is None:
            return None
        return (ATTEMPTS * self.generate_calls * self.request_timeout_s + ENGINE_STARTS_S
                + Engine.START_BACKOFF_MAX_S)

    def server_key(self) -> str:
        """Names this handler's server: one per process (or machine, when shared) for a stage, engine and bound."""
        return f"{self.stage}:{self.batch_size}:{engine_key(self.settings)}"

    def wants(self, element: object) -> bool:
        """Whether ``element`` goes to the model; every other element passes through unchanged."""
        return isinstance(element, WindowRecord)

    @property
    def model_name(self) -> str:
        """The model's name as rows record it (its directory's name)."""
        return os.path.basename(os.path.normpath(self.settings.model_dir))

    def on_failure(self, record: WindowRecord) -> WindowRecord:
        """The window as written when this stage failed for it."""
        return record

    def check(self, record: WindowRecord) -> Optional[Exception]:
        """A problem with a result that did not raise (for example an empty answer)."""
        return None

    def infer_window(self, engine: Engine, window: WindowRecord) -> WindowRecord:
        """The outcome of ``window``: filled in, or with a ``Failure`` on it. Raises only ``EngineStartError``."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                (result,) = self._inference_fn(engine, [window], self.request)
            except EngineStartError:
                raise
            except Exception as error:  # noqa: BLE001 - a model error fails this window alone
                if attempt < ATTEMPTS and (isinstance(error, EngineDied) or is_engine_dead(error)):
                    log.warning("%s; starting it again and retrying window %d of %s",
                                error, window.window_index, window.source)
                    count("engine_restarts")  # this process's progress (Beam counts only a bundle's own thread)
                    engine.restart(getattr(error, "generation", None))  # once per death, however many saw it
                    continue
                return self.failed(window, error)
            problem = self.check(result)
            return result if problem is None else result.with_failure(self._failure(problem, result))
        raise AssertionError("unreachable")

    def _failure(self, error: BaseException, record: WindowRecord):
        return failure_from_exception(
            error, source=record.source, clip_id=record.clip_id, stage=self.stage, window_index=record.window_index,
            source_version=record.source_version,
        )

    def failed(self, window: WindowRecord, error: BaseException) -> WindowRecord:
        """The outcome of ``window`` when this stage failed for it with ``error``."""
        # an engine that could not start is told once, at the end of the run, not once per window
        level = logging.INFO if isinstance(error, EngineStartError) else logging.WARNING
        log.log(level, "%s failed for window %d of %s: %s", self.stage, window.window_index, window.source, error)
        return self.on_failure(window).with_failure(self._failure(error, window))

    def run_inference(
        self, batch: Sequence[object], model: WindowServer, inference_args: Optional[dict] = None
    ) -> Iterable[object]:
        """Every element of ``batch``, in order: windows it wants as their outcomes, the rest unchanged.
        The wanted windows are in flight together (``model`` may be a proxy of a shared server)."""
        wanted = [element for element in batch if self.wants(element)]
        if wanted:
            model.allow_start()
            pool = serve_pool(self.server_key(), self.batch_size)
            futures = [serve_async(model, window, pool) for window in wanted]
            outcomes = iter([future.result() for future in futures])
        for element in batch:
            if not self.wants(element):
                yield element
                continue
            outcome = next(outcomes)
            self.count_outcome(element, outcome)  # counted here: Beam's counters do not cross the proxy
            yield outcome

    def count_outcome(self, window: WindowRecord, outcome: WindowRecord) -> None:
        """Counts a served window for the progress line by its outcome, not the attempt: ``done_counter`` when
        this stage gave it its output, ``windows_<stage>_failed`` when the stage failed for it."""
        failed = len(outcome.failures) > len(window.failures)
        count(f"windows_{self.stage}_failed" if failed else self.done_counter)

    def batch_elements_kwargs(self) -> dict:
        """For use with ``RunInference``: full batches (Beam's adaptive batching would start at one window
        per engine call); a bundle's last batch is flushed at the bundle's end."""
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return f"beam_captions.{self.stage}"
