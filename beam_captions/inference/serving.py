"""One engine and the windows in flight to it: a bound per engine, one outcome per window.

``WindowServer`` is what a window handler's ``load_model`` returns. It lives where the engine lives:
in the worker process, or (``share_model_across_processes``) in the one process per machine that
Beam's ``multi_process_shared`` keeps, with every SDK process talking to it through a proxy. So the
bound on windows in flight (each holds its frames in memory) is per engine, whatever the number of
processes and threads that feed it. The protocol is two blocking calls, so it works through a proxy:

    ticket = server.reserve()             # waits for a free place (backpressure on the caller)
    outcome = server.serve(window, ticket)  # the window with its result or its failure

``serve`` never raises for a window: errors are data on the outcome (``WindowRecord.failures``). It
raises only ``EngineStartError``, when the engine cannot start, which should fail the bundle.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional

from beam_captions.inference.shared_frames import lend, receive

if TYPE_CHECKING:
    from beam_captions.inference.engine import Engine
    from beam_captions.records import WindowRecord

__all__ = [
    "CLAIM_S", "MAX_IN_FLIGHT", "WindowServer", "give_large_buffers_back", "serve_async", "serve_by_reference",
    "serve_pool",
]

MAX_IN_FLIGHT = 4096
"""The most windows in flight per engine (``--captioning-batch-size``, ``--enhance-captions-batch-size``):
each waits on a thread of ``serve_pool``, and vLLM runs at most 1024 sequences at once by default (its
``max_num_seqs`` on the largest GPUs, 256 on others), so past four times that windows only wait, each
holding a thread and (captions) its frames."""

CLAIM_S = 10.0
"""How long a reserved place waits for its window (``reserve`` to ``serve``) before it is taken back. A live
sender serves its ticket at once (the time to hand its window over); one that died in between (killed while
it waited in ``reserve``, which then still hands it a place) would otherwise hold the place for good."""

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def give_large_buffers_back(threshold: int = 1 << 20) -> bool:
    """Make this process's allocations of ``threshold`` bytes and more their own mappings, given back to
    the system when freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``); False where that is not available.

    A shared engine's process receives each window as one large pickled buffer on a connection thread of
    Beam's proxy server. By default glibc raises its mmap threshold to the largest block freed so far, so
    later windows land in per-thread arenas that keep their memory after the window is gone, and the
    process's memory follows the number of sender threads rather than the bound (P12 measures both).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


class WindowServer:
    """Serves windows of one handler (``handler.infer_window``) on one engine, ``bound`` at a time.

    A place is held from ``reserve`` to the end of ``serve``, so a dead SDK process cannot shrink the bound:
    a place not served within ``claim_s`` of its ``reserve`` (its sender died between the two calls) is taken
    back, and so is one served for longer than ``lease_s`` (the handler's longest legitimate window; None: no
    limit). A ticket served after its place was taken back is still served (the bound is exceeded by one
    meanwhile).
    """

    def __init__(self, handler: Any, engine: "Engine", bound: int, lease_s: Optional[float] = None,
                 claim_s: float = CLAIM_S):
        if bound < 1:
            raise ValueError(f"the in-flight bound must be at least 1, got {bound}")
        self.handler = handler
        self.engine = engine
        self.bound = bound
        self.lease_s = lease_s
        self.claim_s = claim_s if lease_s is None else min(claim_s, lease_s)
        self.peak = 0  # most windows held at once, for tests and benchmarks
        self._held: dict[int, float] = {}  # ticket: when its place is taken back (monotonic)
        self._tickets = itertools.count()
        self._changed = threading.Condition()

    def reserve(self) -> int:
        """Wait until fewer than ``bound`` windows are held; a ticket for ``serve`` (or ``release``)."""
        with self._changed:
            while True:
                next_expiry = self._take_back_expired()
                if len(self._held) < self.bound:
                    ticket = next(self._tickets)
                    self._held[ticket] = time.monotonic() + self.claim_s
                    self.peak = max(self.peak, len(self._held))
                    return ticket
                wait = next_expiry - time.monotonic()  # until the next place held now may be taken back
                self._changed.wait(timeout=None if wait > threading.TIMEOUT_MAX else max(wait, 0.01))

    def release(self, ticket: int) -> None:
        """Give back a place (``serve`` does it itself; a caller that will not serve its ticket calls this)."""
        with self._changed:
            self._held.pop(ticket, None)
            self._changed.notify()

    def serve(self, window: "WindowRecord", ticket: int) -> "WindowRecord":
        """The window's outcome, then its place back."""
        with self._changed:  # served: the place is held for the serving time now
            self._held[ticket] = time.monotonic() + (float("inf") if self.lease_s is None else self.lease_s)
            self.peak = max(self.peak, len(self._held))
        try:  # frames lent through shared memory (a sender behind a proxy) are mapped, not copied
            return receive(window, lambda local: self.handler.infer_window(self.engine, local))
        finally:
            self.release(ticket)

    def allow_start(self) -> None:
        """A new bundle: an engine whose start failed may be tried again."""
        self.engine.allow_start()

    def held(self) -> int:
        """Windows in flight now."""
        with self._changed:
            self._take_back_expired()
            return len(self._held)

    def max_held(self) -> int:
        """The most windows that were ever in flight at once (``peak``; a method so it crosses a proxy)."""
        return self.peak

    def _take_back_expired(self) -> float:
        """Take back the places past their time; when the next one held now is (monotonic; inf: none)."""
        now = time.monotonic()
        for ticket, until in list(self._held.items()):
            if until <= now:
                del self._held[ticket]
        return min(self._held.values(), default=float("inf"))


def serve_async(server: Any, window: "WindowRecord", pool: Executor) -> "Future[WindowRecord]":
    """Reserve a place on ``server`` (blocking this thread while the engine's bound is full), then serve
    ``window`` on ``pool``; ``server`` is a ``WindowServer`` or a proxy of one (then the window's frames
    go through shared memory, not pickled: ``serve_by_reference``)."""
    serve = server.serve if isinstance(server, WindowServer) else functools.partial(serve_by_reference, server)
    ticket = server.reserve()
    try:
        future = pool.submit(serve, window, ticket)
    except BaseException:
        server.release(ticket)
        raise
    future.ticket = ticket  # type: ignore[attr-defined]  # to give the place back if the future is cancelled
    return future


def serve_by_reference(server: Any, window: "WindowRecord", ticket: int) -> "WindowRecord":
    """``server.serve(window, ticket)`` through a proxy, the window's frames lent through shared memory
    (``shared_frames.lend``: the block is gone when this returns or raises)."""
    return lend(window, lambda sent: server.serve(sent, ticket))


_serve_pools: dict[str, ThreadPoolExecutor] = {}
_serve_pools_lock = threading.Lock()


def serve_pool(key: str, threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` serving threads for the handler named ``key``, made once.

    Each window in flight waits for its outcome on a thread of this pool. One pool per process, shared by
    every ``ServeWindows`` instance and ``run_inference`` batch of that handler (as its server is), so a
    thread started for one window serves the next ones: a pool per instance started up to ``threads`` new
    threads for every new instance, each start a wait on the step's thread (P4b).
    """
    with _serve_pools_lock:
        pool = _serve_pools.get(key)
        if pool is None:
            pool = _serve_pools[key] = ThreadPoolExecutor(threads, "serve-window")
        return pool
