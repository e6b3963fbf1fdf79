"""What the caption and enhancement handlers share: one vLLM engine, batching, per-window isolation."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from apache_beam.ml.inference.base import ModelHandler

from beam_captions.inference.engine import Engine, EngineSettings, llm_kwargs, load_engine
from beam_captions.inference.isolation import is_engine_dead, run_isolated
from beam_captions.metrics import count
from beam_captions.records import Failure, WindowRecord, failure_from_exception

__all__ = ["Outcome", "SharedEngine", "VLLMWindowHandler"]

log = logging.getLogger(__name__)

Outcome = tuple[WindowRecord, Optional[Failure]]
InferenceFn = Callable[[Engine, Sequence[WindowRecord], Any], list[WindowRecord]]


class VLLMWindowHandler(ModelHandler[WindowRecord, Outcome, Engine]):
    """Runs ``inference_fn(engine, windows, request)`` on the ``WindowRecord``s this handler ``wants``.

    Other elements of a batch (clip infos, failures, windows with nothing to do) pass through, so
    the handler sits on the pipeline's one mixed PCollection without splitting it. A failing batch is retried window by window; a window that still fails comes back
    unchanged but for ``on_failure`` and with a ``Failure`` of this handler's ``stage``,
    so the rest of its batch keeps its results.
    """

    stage = "inference"
    done_counter = "windows_inferred"

    def __init__(
        self,
        settings: EngineSettings,
        request: Any,
        inference_fn: InferenceFn,
        *,
        batch_size: int,
        share_across_processes: bool = False,
        model_copies: Optional[int] = None,
    ):
        # Beam's own switches: one engine per machine shared by its processes (large_model), or exactly
        # ``model_copies`` per machine; either way RunInference (and ServeWindows) then use a proxy.
        super().__init__(large_model=share_across_processes, model_copies=model_copies)
        self.settings = settings
        self.request = request
        self.batch_size = batch_size
        self._inference_fn = inference_fn

    def load_model(self) -> Union[Engine, "SharedEngine"]:
        engine = load_engine(self.settings)
        return SharedEngine(self, engine) if self.share_model_across_processes() else engine

    def on_failure(self, record: WindowRecord, engine: Engine) -> WindowRecord:
        """The window as written when this stage failed for it."""
        return record

    def check(self, record: WindowRecord) -> Optional[Exception]:
        """A problem with a result that did not raise (for example an empty answer)."""
        return None

    def _failure(self, error: Exception, record: WindowRecord) -> Failure:
        return failure_from_exception(
            error, source=record.source, clip_id=record.clip_id, stage=self.stage, window_index=record.window_index
        )

    def wants(self, element: object) -> bool:
        """Whether ``element`` goes to the model; every other element passes through unchanged."""
        return isinstance(element, WindowRecord)

    def run_inference(
        self, batch: Sequence[object], model: Any, inference_args: Optional[dict] = None
    ) -> Iterable[Outcome]:
        wanted = [element for element in batch if self.wants(element)]
        if not wanted:
            outcomes: list[Outcome] = []
        elif self.share_model_across_processes():
            # ``model`` is a multi_process_shared proxy of a SharedEngine: it forwards method calls only and
            # pickles their arguments and results, so the windows run where the engine is and come back done.
            outcomes = model.outcomes(wanted)
        else:
            outcomes = self.outcomes(wanted, model)
        done = iter(outcomes)
        for element in batch:
            if not self.wants(element):
                yield element, None
                continue
            count(self.done_counter)  # counted here: Beam's counters do not cross the proxy
            yield next(done)

    def outcomes(self, windows: Sequence[WindowRecord], model: Engine) -> list[Outcome]:
        """(window, failure or None) for each of ``windows``; a window that fails, fails alone."""
        model.start()  # a model that cannot load fails the bundle, not each window
        results = run_isolated(lambda part: self._infer(model, part), windows)
        outcomes: list[Outcome] = []
        for window, result in zip(windows, results):
            if isinstance(result, Exception):
                outcomes.append((self.on_failure(window, model), self._failure(result, window)))
                continue
            problem = self.check(result)
            outcomes.append((result, self._failure(problem, result) if problem else None))
        return outcomes

    def _infer(self, model: Engine, part: Sequence[WindowRecord]) -> list[WindowRecord]:
        """One call into the engine; an engine that died is started again and the call retried once."""
        seen = getattr(model, "generation", None)
        try:
            return self._inference_fn(model, part, self.request)
        except Exception as error:
            if not is_engine_dead(error):
                raise
            log.warning("the %s engine died (%s); starting it again", self.stage, error)
            count("engine_restarts")
            model.restart(seen)  # threads that saw the same death restart it once
            return self._inference_fn(model, part, self.request)

    def batch_elements_kwargs(self) -> dict:
        """For use with ``RunInference``: full batches (Beam's adaptive batching would start at one window
        per engine call); a bundle's last batch is flushed at the bundle's end."""
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    @property
    def max_in_flight(self) -> int:
        """Windows a worker process keeps in flight to the engine (``ServeWindows``): the batch size."""
        return self.batch_size

    def engine_key(self) -> str:
        """Names this handler's engine: handlers with the same key share one engine (and one bound)."""
        return f"{self.stage}:{json.dumps(llm_kwargs(self.settings), sort_keys=True, default=str)}"

    def get_metrics_namespace(self) -> str:
        return f"beam_captions.{self.stage}"


class SharedEngine:
    """The engine of a handler that shares it across processes (``share_model_across_processes``).

    RunInference keeps this object in one process per machine and gives every process a
    ``multi_process_shared`` proxy to it, which forwards method calls only (no attributes) and pickles
    their arguments and results: so whole batches run here, next to the engine, and only windows and
    failures travel between processes.
    """

    def __init__(self, handler: VLLMWindowHandler, engine: Engine):
        self._handler = handler
        self._engine = engine

    def outcomes(self, windows: list[WindowRecord]) -> list[Outcome]:
        return self._handler.outcomes(windows, self._engine)
