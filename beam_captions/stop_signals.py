"""SIGINT and SIGTERM acted on at once, whichever thread the kernel hands them to.

Python runs a signal handler in the main thread, and only when that thread next runs Python code. The
kernel may deliver a signal to any thread of the process; while the main thread waits without a timeout
(the DirectRunner's main thread waits on its workers' futures for a whole stage) the handler waits too, so
a Ctrl-C could take effect only once the stage was done. ``StopSignals`` has Python write each signal's
number to a pipe (``signal.set_wakeup_fd``, done by the C-level handler in whichever thread got it) and
reads that pipe in a thread of its own, which calls back at once.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

__all__ = ["StopSignals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread; elsewhere it does nothing, as signals cannot be set there), each
    SIGINT or SIGTERM calls ``on_signal(signum, count)`` from a watcher thread, ``count`` being 1 for the
    first one, 2 for the second...; ``in_main(signum)``, if given, is the Python-level handler (the main
    thread, whenever it gets to run it; it may raise ``KeyboardInterrupt``), else the handler does nothing.
    ``restore`` (or leaving the ``with``) puts back the earlier handlers and wakeup fd."""

    def __init__(self, on_signal: Callable[[int, int], None], in_main: Optional[Callable[[int], None]] = None):
        self.on_signal, self.in_main = on_signal, in_main
        self._previous: dict[int, object] = {}
        self._previous_fd: Optional[int] = None
        self._pipe: Optional[tuple[int, int]] = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # a full pipe must never block a signal handler
        self._pipe = (read_end, write_end)
        self._previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, self._python_handler) for signum in STOP_SIGNALS}
        threading.Thread(target=self._watch, args=(read_end,), name="beam-captions-stop-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers and wakeup fd found on entry; the watcher ends."""
        if self._pipe is None:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        os.close(self._pipe[1])  # the watcher reads the end of the pipe and closes its own end
        self._pipe, self._previous = None, {}

    def _python_handler(self, signum, frame) -> None:
        if self.in_main is not None:
            self.in_main(signum)

    def _watch(self, read_end: int) -> None:
        count = 0
        try:
            while True:
                data = os.read(read_end, 64)
                if not data:
                    return
                for signum in data:
                    if signum in STOP_SIGNALS:
                        count += 1
                        self.on_signal(signum, count)
        finally:
            os.close(read_end)
