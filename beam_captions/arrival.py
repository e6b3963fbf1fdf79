"""What has arrived of a clip, and what was written: the bookkeeping that tells a writer a clip is complete
(``clip_complete``), which streaming partition it goes to (``time_partition``), and which deliveries are
duplicates of a clip already written (``Written``, ``same_delivery``, ``RecentlyWritten``). No Beam here."""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Optional, Union

from beam_captions.io.partitions import TimePartitions
from beam_captions.records import ClipInfo, Failure, WindowRecord

__all__ = ["RECENTLY_WRITTEN_CLIPS", "Arrival", "RecentlyWritten", "Written", "clip_complete", "same_delivery",
           "time_partition", "version_of"]

Element = Union[ClipInfo, WindowRecord, Failure]


def version_of(elements: list[Element]) -> Optional[tuple[int, float]]:
    """The source version that the clip's elements carry (``None`` where none does)."""
    for element in elements:
        version = getattr(element, "source_version", None)
        if version is not None:
            return tuple(version)
    return None


class Arrival:
    """What has arrived of one clip, as far as its completeness goes: the distinct window indices (a
    window delivered twice counts once) and the fewest windows that a ``ClipInfo`` (``num_windows``) or
    a ``prepare`` failure (``windows_before``) says went out (None until one of them arrives).

    Small (ints, never frames), so the keyed write keeps it in its own state and decides completeness
    per element without reading the clip's buffered elements back."""

    __slots__ = ("windows", "needed")

    def __init__(self) -> None:
        self.windows: set[int] = set()
        self.needed: Optional[int] = None

    @classmethod
    def of(cls, elements: Iterable[Element]) -> "Arrival":
        arrival = cls()
        for element in elements:
            arrival.add(element)
        return arrival

    def add(self, element: Element) -> None:
        if isinstance(element, WindowRecord):
            self.windows.add(element.window_index)
            return
        if isinstance(element, ClipInfo):
            needed = element.num_windows
        elif isinstance(element, Failure) and element.stage == "prepare":
            needed = element.windows_before
        else:
            return
        self.needed = needed if self.needed is None else min(self.needed, needed)

    @property
    def complete(self) -> bool:
        return self.needed is not None and len(self.windows) >= self.needed

    def __getstate__(self):
        return self.windows, self.needed

    def __setstate__(self, state) -> None:
        self.windows, self.needed = state


def clip_complete(elements: Iterable[Element]) -> bool:
    """Whether every element of a clip has arrived: its ``ClipInfo`` (or ``prepare`` failure) and as
    many distinct windows as that says went out."""
    return Arrival.of(elements).complete


def time_partition(elements: Iterable[Element], partitions: Optional[TimePartitions],
                   now: Optional[float] = None) -> Optional[str]:
    """``window=<UTC start>`` of the fixed event-time window of the clip's arrival (streaming), else ``None``;
    the window of ``now`` (the write) for a clip whose own window closed past the lateness horizon.

    The arrival time travels in the clip's ``ClipInfo`` or ``prepare`` failure: element timestamps
    are not relied on past the model steps, which hand windows on as they finish.
    """
    found = [e.found_at for e in elements if isinstance(e, (ClipInfo, Failure)) and e.found_at is not None]
    if partitions is None or not found:
        return None
    return partitions.for_clip(found[0], now)


@dataclasses.dataclass(frozen=True)
class Written:
    """Tells the keyed write that a clip (of this source version) was written before it."""

    clip_id: str
    source_version: Optional[tuple[int, float]]


def same_delivery(written: tuple, element: Element) -> bool:
    """Whether ``element`` belongs to the written delivery: the same, known source version. An element
    whose version is not known is never taken for a duplicate."""
    version = getattr(element, "source_version", None)
    return version is not None and version == written[0]


RECENTLY_WRITTEN_CLIPS = 10_000
"""How many clips each ``_WriteCompleteInBundle`` instance remembers having written (an LRU; some
2 MB of clip ids and versions). A bounded, recent set is enough: a duplicate delivery (a retried
bundle, a file listed or notified twice) arrives close to its original delivery, so the clip is still
among the last ones written; a later duplicate is caught by the keyed write's ``Written`` state
(per clip, kept by the runner), and an incomplete write never replaces a complete one of the same
source version (``write_clip``). Unbounded, the set would grow with every clip of a streaming job."""


class RecentlyWritten:
    """The last ``limit`` clips written, by clip id, with what ``same_delivery`` compares (the least
    recently written or looked-up one is forgotten first)."""

    def __init__(self, limit: int = RECENTLY_WRITTEN_CLIPS):
        self.limit = limit
        self._clips: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def get(self, clip_id: str) -> Optional[tuple]:
        found = self._clips.get(clip_id)
        if found is not None:
            self._clips.move_to_end(clip_id)
        return found

    def __setitem__(self, clip_id: str, written: tuple) -> None:
        self._clips[clip_id] = written
        self._clips.move_to_end(clip_id)
        while len(self._clips) > self.limit:
            self._clips.popitem(last=False)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._clips

    def __len__(self) -> int:
        return len(self._clips)
