"""Live progress of a local run: counters bumped in this process, printed by a background thread.

Every ``metrics.count`` also lands here, so a DirectRunner run (in-process workers) shows what
is happening while it runs. Remote runners have their own consoles; there nothing is printed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Optional, TextIO

__all__ = ["bump", "snapshot", "ProgressReporter", "progress_line"]

_counts: Counter = Counter()
_lock = threading.Lock()


def bump(name: str, value: int = 1) -> None:
    with _lock:
        _counts[name] += value


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def _reset() -> None:
    with _lock:
        _counts.clear()


def progress_line(
    counts: dict[str, int], seconds: float, captions: bool = True, locations: Optional[int] = None
) -> str:
    """One line: clips found and decoded, windows prepared (captioned, enhanced, and those whose caption or
    enhancement failed: outcomes, not attempts), previews, rate.

    ``locations``: how many ``--input`` locations are being listed; until each has been listed the clip
    total is what was found so far (``12+``, "listing"). ``captions=False`` (a previews-only run) leaves
    out the caption counters.
    """
    found = counts.get("clips_found", 0)
    listing = locations is not None and (counts.get("listings_done", 0) < locations  # shards: a gs:// listing spread out
                                         or counts.get("listing_shards_done", 0) < counts.get("listing_shards", 0))
    total = f"{found}+" if listing else f"{found}"
    line = f"[{seconds:6.0f} s] clips {counts.get('clips_decoded', 0)}/{total} decoded"
    if listing:
        line += " (listing)"
    previews = counts.get("previews_encoded", 0)
    if captions:
        captioned = counts.get("windows_captioned", 0)
        rate = captioned / seconds if seconds > 0 else 0.0
        failed = [f"{counts[name]} {what} failed" for name, what in
                  (("windows_caption_failed", "caption"), ("windows_enhance_failed", "enhancement")) if counts.get(name)]
        return (
            f"{line} | windows {counts.get('windows_prepared', 0)} prepared, {captioned} captioned,"
            f" {counts.get('windows_enhanced', 0)} enhanced{''.join(', ' + text for text in failed)}"
            f" | previews {previews} | {rate:.2f} captions/s"
        )
    rate = previews / seconds if seconds > 0 else 0.0
    return f"{line} | windows {counts.get('windows_prepared', 0)} | previews {previews} | {rate:.2f} previews/s"


class ProgressReporter:
    """Prints ``progress_line`` every ``interval`` s: in place on a terminal, as plain lines otherwise."""

    def __init__(
        self,
        stream: TextIO = sys.stderr,
        interval: Optional[float] = None,
        *,
        captions: bool = True,
        locations: Optional[int] = None,
        streaming: bool = False,
    ):
        self.stream = stream
        self.captions = captions
        self.locations = None if streaming else locations  # a watched folder is never listed to the end
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 30.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beam-captions-progress", daemon=True)
        self._started = 0.0

    def __enter__(self) -> "ProgressReporter":
        _reset()
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _print(self) -> None:
        line = progress_line(snapshot(), time.monotonic() - self._started, self.captions, self.locations)
        self.stream.write(f"\r\x1b[2K{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._print()
        self._print()
