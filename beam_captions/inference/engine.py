"""A vLLM engine served from its own event-loop thread: the settings it gets, and the engine itself."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = [
    "EngineClosed", "EngineDied", "EngineSettings", "EngineStartError", "Engine", "PERFORMANCE_MODES", "llm_kwargs",
    "load_engine", "release_engines", "start_failures",
]

log = logging.getLogger(__name__)


def is_engine_dead(error: BaseException) -> bool:
    """vLLM's ``EngineDeadError``: the engine process is gone and must be started again."""
    return type(error).__name__ == "EngineDeadError"


PERFORMANCE_MODES = ("balanced", "interactivity", "throughput")  # vLLM's performance_mode (0.32 and 0.33)


@dataclass(frozen=True)
class EngineSettings:
    """What the vLLM engine is built with; ``extra`` (``--vllm-kwargs``) overrides the rest."""

    model_dir: str
    fp8: bool = False
    disable_mmcache: bool = True
    dtype: str = "auto"
    max_model_len: int = 32768
    gpu_memory_utilization: float = 0.85
    multimodal: bool = True
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # The hub checkpoint a local ``model_dir`` without weights is downloaded from (revision None: the pinned one).
    hub_model_id: Optional[str] = None
    hub_revision: Optional[str] = None
    # The model family's vLLM processor arguments (Qwen-VL: the reference's per-frame pixel cap).
    mm_processor_kwargs: tuple[tuple[str, Any], ...] = (("cap_pixels_per_frame", True),)
    # A Mamba hybrid (Nemotron): vLLM's CPU Mamba prefill fails with prefix caching on, so without a GPU it is off.
    mamba: bool = False
    # vLLM's performance_mode (PERFORMANCE_MODES); None: "throughput" on a GPU, vLLM's own default without one.
    performance_mode: Optional[str] = None

    def __post_init__(self) -> None:
        if self.performance_mode is not None and self.performance_mode not in PERFORMANCE_MODES:
            raise ValueError(f"performance_mode must be one of {', '.join(PERFORMANCE_MODES)}, "
                             f"got {self.performance_mode!r}")


class EngineStartError(RuntimeError):
    """The engine could not start; every request that waited on that start gets this error."""


class EngineClosed(EngineStartError):
    """The engine was shut down (the run is stopping): nothing starts it again."""


_START_FAILURES: list[str] = []  # this process's engine start failures, for the run's one-line error


def start_failures() -> list[str]:
    """Why each engine that could not start in this process failed (one line each)."""
    return list(_START_FAILURES)


class EngineDied(RuntimeError):
    """A request found its engine dead, hung past the request timeout, or replaced under it.

    ``generation`` is the engine generation the request ran on, so that threads that see the same
    death restart the engine once (``Engine.restart``).
    """

    def __init__(self, message: str, generation: int):
        super().__init__(message)
        self.generation = generation

    def __reduce__(self):  # picklable across Beam's multi-process proxy
        return (EngineDied, (str(self), self.generation))


MAX_BATCHED_TOKENS = 32768  # the reference's max_num_batched_tokens; never more than max_model_len


def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU here (False on the CPU build of vLLM)."""
    from beam_captions.inference.gpu_budget import gpu_total_gib

    return gpu_total_gib() is not None


def llm_kwargs(settings: EngineSettings) -> dict[str, Any]:
    """Engine arguments for vLLM (the reference's settings, then the user's overrides)."""
    kwargs: dict[str, Any] = {
        "model": settings.model_dir,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_batched_tokens": min(settings.max_model_len, MAX_BATCHED_TOKENS),
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "trust_remote_code": settings.trust_remote_code,
        "disable_log_stats": True,
    }
    if settings.multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": 0, "video": 1}
        if settings.mm_processor_kwargs:
            kwargs["mm_processor_kwargs"] = dict(settings.mm_processor_kwargs)
        if settings.disable_mmcache:
            kwargs["mm_processor_cache_gb"] = 0
    if settings.fp8:
        kwargs["quantization"] = "fp8"
    if settings.mamba and not gpu_available():
        kwargs["enable_prefix_caching"] = False  # IndexError in vLLM's CPU Mamba prefill kernel otherwise
    mode = settings.performance_mode or ("throughput" if gpu_available() else None)
    if mode:  # throughput: more sequences per step (and larger CUDA graphs); a caption job is a batch job
        kwargs["performance_mode"] = mode
    kwargs.update(settings.extra)
    if settings.multimodal and kwargs.get("video_pruning_rate"):
        from beam_captions.inference.pruning import pruning_runs_here, warn_pruning_gap

        if not pruning_runs_here():  # refused up front for a local run; a CPU worker captions unpruned
            warn_pruning_gap(kwargs["video_pruning_rate"])
            kwargs["video_pruning_rate"] = 0.0
    return kwargs


def check_engine_memory(settings: EngineSettings, kwargs: dict[str, Any]) -> None:
    """Refuse, before loading, a memory share of this machine's GPU that cannot hold the model (no GPU: no check)."""
    from beam_captions.inference.gpu_budget import check_share, gpu_total_gib

    total = gpu_total_gib()
    if total is None or "model" in settings.extra:
        return
    check_share(
        settings.hub_model_id, total, float(kwargs["gpu_memory_utilization"]), fp8=settings.fp8,
        tokens=int(kwargs["max_model_len"]),
    )


def _final_only(params: Any) -> Any:
    """``params`` asking for the finished output only (no per-token partial outputs to move around)."""
    from vllm.sampling_params import RequestOutputKind

    if params.output_kind == RequestOutputKind.FINAL_ONLY:
        return params
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


async def _final_output(llm: Any, prompt: dict, params: Any) -> Any:
    final = None
    async for output in llm.generate(prompt, params, request_id=uuid.uuid4().hex):
        final = output
    return final


async def _generate_all(llm: Any, inputs: Sequence[dict], params: Any) -> list:
    """Every input as its own request, all in flight at once; the first error cancels the rest."""
    tasks = [asyncio.ensure_future(_final_output(llm, prompt, params)) for prompt in inputs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


RENDERED_KEPT = 64  # chat texts an engine keeps (render_chat)


class Engine:
    """vLLM's async engine on its own event-loop thread, started on first use.

    ``generate`` may be called from any number of threads at once, with no lock around generation:
    each call's requests join the engine's running batch and vLLM schedules them together (continuous
    batching), so a caller waits for its own requests only. Starting lazily means a worker that
    gets no window (a re-run where every clip is already done) never loads the model.

    Lifecycle: one start per generation, however many threads wait on it. A failed start is
    remembered: every caller that was waiting on it, and every later one until ``allow_start``
    (a new bundle), gets the same ``EngineStartError`` at once instead of loading again; a restart
    is tried once per generation that died, however many windows saw it die. A start tried again
    after failed ones waits first (``START_BACKOFF_S``, doubling, at most ``START_BACKOFF_MAX_S``).
    A request is sent under the lock, so it never races a restart; a request that sees the engine
    die, hang past ``request_timeout_s`` or be replaced raises ``EngineDied`` (a retry, not a failure).
    """

    START_BACKOFF_S = 10.0
    """The wait before the first start tried again after a failed one; it doubles with each failure in a row."""
    START_BACKOFF_MAX_S = 300.0
    """The longest wait before a start tried again (a window's time limit allows for it)."""

    def __init__(self, settings: EngineSettings, request_timeout_s: Optional[float] = None):
        self.settings = settings
        self.request_timeout_s = request_timeout_s
        self.name = os.path.basename(os.path.normpath(settings.model_dir))
        self.generation = 0  # bumped at every start, so a restart can tell whether the engine it saw die is gone
        self.start_attempts = 0  # starts tried, failed ones included
        self._start_failure: Optional[EngineStartError] = None
        self._failed_starts = 0  # failed starts in a row, and when the last one failed: the backoff
        self._failed_at = 0.0
        self._restarted_from: Optional[int] = None  # the generation whose death a restart was tried for
        self._closed = False
        self._closing = threading.Event()  # set by close: a backoff wait ends at once
        self._llm: Any = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._rendered: dict[str, str] = {}  # render_chat's texts by their messages (the same for most windows)

    def start(self) -> "Engine":
        """Start the engine if it is not running; raise the remembered error if its start failed."""
        with self._start_lock:
            self._start_if_needed()
        return self

    def allow_start(self) -> None:
        """Forget a failed start, so that the next request tries again (Beam retries the bundle)."""
        with self._start_lock:
            self._start_failure = None

    def _start_if_needed(self) -> None:
        if self._closed:
            raise EngineClosed(f"the {self.name} engine was shut down")
        if self._llm is not None:
            return
        if self._start_failure is not None:
            raise self._start_failure
        self._back_off()
        self.start_attempts += 1
        log_offset = _log_size()
        try:
            self._start()
        except BaseException as error:  # noqa: BLE001 - remembered, then raised to every waiter
            if self._closed:  # stopped while starting (Ctrl-C reaches the engine's processes too)
                raise EngineClosed(f"the {self.name} engine was shut down") from error
            self._failed_starts, self._failed_at = self._failed_starts + 1, time.monotonic()
            cause = _root_cause(error, log_offset)
            self._start_failure = EngineStartError(f"the {self.name} engine could not start: {cause}")
            _START_FAILURES.append(str(self._start_failure))
            log.info("the %s engine could not start", self.name, exc_info=error)  # the trace: log file only
            raise self._start_failure from error
        self._failed_starts = 0
        if self._closed:  # shut down while it started: stop it again
            self._stop()
            raise EngineClosed(f"the {self.name} engine was shut down")

    def _back_off(self) -> None:
        """Wait before a start tried again after failed ones (under the lock: the waiters wait on it anyway);
        ``close`` ends the wait."""
        if not self._failed_starts:
            return
        delay = min(self.START_BACKOFF_S * 2 ** min(self._failed_starts - 1, 30), self.START_BACKOFF_MAX_S)
        remaining = self._failed_at + delay - time.monotonic()
        if remaining > 0:
            log.info("the %s engine failed to start %d time(s) in a row: waiting %.0f s before trying again",
                     self.name, self._failed_starts, remaining)
            self._closing.wait(remaining)
        if self._closed:
            raise EngineClosed(f"the {self.name} engine was shut down")

    def _engine_kwargs(self) -> dict[str, Any]:
        from beam_captions.inference.model_source import resolve_model_dir

        kwargs = llm_kwargs(self.settings)
        settings = self.settings
        if "model" not in settings.extra:  # a gs:// prefix or an empty folder becomes local weights
            kwargs["model"] = resolve_model_dir(
                settings.model_dir, model_id=settings.hub_model_id, revision=settings.hub_revision
            )
        return kwargs

    def _start(self) -> None:
        check_engine_memory(self.settings, llm_kwargs(self.settings))  # before any download
        kwargs = self._engine_kwargs()
        log.info("starting vLLM: %s", json.dumps(kwargs, default=str))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"vllm-{self.name}", daemon=True)
        thread.start()

        async def build() -> Any:  # built inside the loop, so its output handler runs there
            from vllm import AsyncEngineArgs, AsyncLLMEngine

            from beam_captions.inference.orphans import tie_engine_processes
            from beam_captions.logs import route_transformers

            route_transformers()  # imported by vLLM just now: its warnings go to the log file
            tie_engine_processes()  # its processes die with this thread's process, even SIGKILLed
            return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))

        from beam_captions.logs import engine_output_to_log

        try:
            with engine_output_to_log():  # its processes print to the log file, not the terminal
                llm = asyncio.run_coroutine_threadsafe(build(), loop).result()
            # Registered after vLLM's own exit hooks, so it runs before them: the engines stop in order. A close,
            # not a shutdown: a thread waiting to start it again (a backoff, under the start lock) stops waiting.
            atexit.register(self.close)
        except BaseException:
            _stop_loop(loop, thread)
            raise
        self._llm, self._loop, self._thread = llm, loop, thread
        self.generation += 1

    @property
    def tokenizer(self) -> Any:
        with self._start_lock:
            self._start_if_needed()
            return self._llm.get_tokenizer()

    def submit(self, inputs: Sequence[dict], sampling_params: Any) -> tuple["Future[list]", int]:
        """Send ``inputs`` to the engine now: a future of one final ``RequestOutput`` per input, and the
        generation it went to. Sent under the lock, so a restart cannot close the loop in between."""
        params = _final_only(sampling_params)
        with self._start_lock:
            self._start_if_needed()
            future = asyncio.run_coroutine_threadsafe(_generate_all(self._llm, list(inputs), params), self._loop)
            return future, self.generation

    def generate(self, inputs: Sequence[dict], sampling_params: Any) -> list:
        """One final ``RequestOutput`` per input, in order (blocks this thread only, at most
        ``request_timeout_s``). A dead, hung or replaced engine raises ``EngineDied``."""
        future, generation = self.submit(inputs, sampling_params)
        try:
            return future.result(timeout=self.request_timeout_s)
        except FutureTimeout as error:
            future.cancel()
            raise EngineDied(f"no answer from the {self.name} engine in {self.request_timeout_s:g} s "
                             "(a hung engine)", generation) from error
        except (CancelledError, asyncio.CancelledError) as error:
            raise self._gone(f"the request was cancelled: the {self.name} engine was stopped", generation) from error
        except Exception as error:
            if is_engine_dead(error) or "Event loop is closed" in str(error):
                raise self._gone(f"the {self.name} engine died ({type(error).__name__}: {error})", generation) from error
            raise

    def _gone(self, message: str, generation: int) -> Exception:
        """The error for a request whose engine went away: ``EngineClosed`` once the engine was closed for
        good (a stopping run: nothing retries, nothing starts it again), else ``EngineDied`` (restart, retry)."""
        return EngineClosed(message) if self._closed else EngineDied(message, generation)

    def restart(self, generation: Optional[int] = None) -> "Engine":
        """Start a new engine after this one died.

        ``generation`` is the one the caller saw die (None: the current one): when several threads see
        the same death, the first restarts the engine and the others find it already replaced, or get
        the failure of its restart (tried once per generation, however many windows saw the death).
        """
        with self._start_lock:
            seen = self.generation if generation is None else generation
            if seen == self.generation and self._restarted_from != seen:
                self._restarted_from = seen
                self._stop()
                self._start_failure = None
            self._start_if_needed()
        return self

    def shutdown(self) -> None:
        with self._start_lock:
            self._stop()

    def close(self, wait: bool = True) -> None:
        """Shut the engine down for good: no request starts it again. Without ``wait``, an engine that is
        starting right now is left to stop itself when its start returns (a stopping run does not wait)."""
        self._closed = True
        self._closing.set()
        if self._start_lock.acquire(timeout=-1 if wait else 0.5):
            try:
                self._stop()
            finally:
                self._start_lock.release()

    def _stop(self) -> None:
        llm, loop, thread = self._llm, self._loop, self._thread
        self._llm = self._loop = self._thread = None
        if loop is not None:  # first the loop's tasks (vLLM's output handler), so none sees the core go
            _cancel_tasks_of(loop)
        if llm is not None:
            try:
                llm.shutdown()
            except Exception as error:  # noqa: BLE001 - a dead engine may not shut down cleanly
                log.warning("engine shutdown: %s", error)
        if loop is not None and thread is not None:
            _stop_loop(loop, thread)

    def render_chat(self, messages: list[dict], **template_kwargs: Any) -> str:
        """``messages`` rendered with the model directory's chat template, ready for generation.

        Up to ``RENDERED_KEPT`` texts are kept: every window of a stage sends the same messages (its
        frames travel apart), and rendering the template costs the serving process more than a window's
        own work there (P4b's short captions)."""
        key = json.dumps([messages, template_kwargs], sort_keys=True, default=str)
        text = self._rendered.get(key)
        if text is None:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
            if len(self._rendered) >= RENDERED_KEPT:
                self._rendered.clear()  # stage 2's prompts differ per window: keep the cache small
            self._rendered[key] = text
        return text


async def _cancel_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _cancel_tasks_of(loop: asyncio.AbstractEventLoop) -> None:
    try:
        asyncio.run_coroutine_threadsafe(_cancel_tasks(), loop).result(timeout=10)
    except Exception as error:  # noqa: BLE001 - stopping goes on whatever the tasks do
        log.debug("cancelling engine tasks: %s", error)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Let the loop's remaining tasks finish cancelling, then stop it."""
    _cancel_tasks_of(loop)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    if not thread.is_alive():
        loop.close()


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def engine_key(settings: EngineSettings) -> str:
    """Names an engine: settings with the same vLLM arguments share one."""
    return json.dumps(llm_kwargs(settings), sort_keys=True, default=str)


def load_engine(settings: EngineSettings, request_timeout_s: Optional[float] = None) -> Engine:
    """The process's engine for ``settings`` (one per distinct settings, shared); it starts on first use."""
    key = engine_key(settings)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = Engine(settings, request_timeout_s)
        engine = _engines[key]
        if request_timeout_s is not None:
            engine.request_timeout_s = request_timeout_s
        return engine


def release_engines(only: Optional[Engine] = None, wait: bool = True) -> None:
    """Shut down ``only``, or every engine this process started (at the end of a local run); ``wait=False``
    (a run that is stopping) does not wait for an engine in the middle of its start."""
    with _engines_lock:
        keys = [key for key, engine in _engines.items() if only is None or engine is only]
        engines = [_engines.pop(key) for key in keys]
    for engine in engines:
        engine.close(wait=wait)


_WRAPPER_ERRORS = ("Engine core initialization failed", "WorkerProc initialization failed",
                   "EngineCore failed to start")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def _log_size() -> Optional[int]:
    from beam_captions.logs import log_path

    path = log_path()
    try:
        return os.path.getsize(path) if path else None
    except OSError:
        return None


def _root_cause(error: BaseException, log_offset: Optional[int]) -> str:
    """One line saying why a start failed: the first error the engine's processes wrote to the log since
    ``log_offset`` (vLLM's own exception only says "see root cause above"), else ``error``'s message."""
    message = " ".join(str(error).split()) or type(error).__name__
    from beam_captions.logs import log_path

    path = log_path()
    if log_offset is None or not path:
        return message
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            handle.seek(log_offset)
            lines = handle.read().splitlines()
    except OSError:
        return message
    for line in lines:
        found = _ERROR_LINE.match(line.strip())
        if found and not any(wrapper in found.group(2) for wrapper in _WRAPPER_ERRORS):
            return f"{found.group(1)}: {found.group(2)}"[:500]
    return message

