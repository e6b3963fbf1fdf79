"""Event-time partitions of a streaming output (``captions/window=<UTC start>/``) and when one closes.

A streaming job writes a clip's rows to the partition of the window in which its file was found. A
clip written more than ``lateness_horizon_s`` after that window ended goes to the window of its write
instead, so a partition older than the horizon gets no new files: ``compact`` merges only those, and
never races the job for a partition it still writes. The job records its settings in
``OUT/captions/_streaming.json`` (the leading underscore keeps it out of table reads) for ``compact``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import read_json_or_none, write_json
from beam_captions.io.paths import captions_dir

__all__ = ["TimePartitions", "read_settings", "write_settings"]

_PREFIX = "window="
_FORMAT = "%Y-%m-%dT%H-%M-%SZ"
_SETTINGS = "_streaming.json"


@dataclasses.dataclass(frozen=True)
class TimePartitions:
    """Fixed windows of ``window_seconds``; ``lateness_horizon_s`` (``None``: never) after its end a
    window's partition is closed."""

    window_seconds: float
    lateness_horizon_s: Optional[float] = None

    def _name(self, at: float) -> str:
        start = at - at % self.window_seconds
        return _PREFIX + datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime(_FORMAT)

    def for_clip(self, found_at: float, now: Optional[float] = None) -> str:
        """The partition of a clip found at ``found_at`` and written ``now``: its window's, or the current
        window's when its own closed."""
        own = self._name(found_at)
        if self.lateness_horizon_s is not None and self.is_closed(own, time.time() if now is None else now):
            return self._name(time.time() if now is None else now)
        return own

    def is_closed(self, partition: str, now: Optional[float] = None) -> bool:
        """Whether ``partition`` gets no more files (always False without a horizon; True for a folder
        that is not a window partition, such as the top of a batch output)."""
        if not partition.startswith(_PREFIX):
            return True
        if self.lateness_horizon_s is None:
            return False
        start = datetime.datetime.strptime(partition[len(_PREFIX):], _FORMAT).replace(tzinfo=datetime.timezone.utc)
        end = start.timestamp() + self.window_seconds
        return end + self.lateness_horizon_s <= (time.time() if now is None else now)


def _settings_path(output: str) -> str:
    return FileSystems.join(captions_dir(output), _SETTINGS)


def write_settings(output: str, partitions: TimePartitions) -> None:
    """Record a streaming job's partitions for ``compact``."""
    write_json(_settings_path(output), dataclasses.asdict(partitions))


def read_settings(output: str) -> Optional[TimePartitions]:
    """The partitions a streaming job recorded under ``output`` (``None``: a batch output)."""
    found = read_json_or_none(_settings_path(output))
    if not found:
        return None
    return TimePartitions(float(found["window_seconds"]), found.get("lateness_horizon_s"))
