"""SpreadListing: list gs:// shards level by level, each level's shards spread over the workers."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional, Union

import apache_beam as beam

from beam_captions.io.listing import Found, ListingPlan, Shard, list_shard
from beam_captions.io.paths import local_path
from beam_captions.metrics import count

__all__ = ["SpreadListing", "local_files"]

SHARDS, SHARDS_DONE = "listing_shards", "listing_shards_done"  # the progress line says "listing" until they meet


def local_files(folder: str) -> Iterator[Found]:
    """The files directly in a local ``folder`` with their ``(size, mtime)``; none if it does not exist."""
    try:
        entries = list(os.scandir(local_path(folder)))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.is_file():
                found = entry.stat()
                yield Found(entry.path, (found.st_size, found.st_mtime))
        except FileNotFoundError:  # removed since the scan
            continue


class _Expand(beam.DoFn):
    """Lists each shard that comes in (objects ``keep`` passes; where it is too large, the shards of its
    rest, to be listed at the next level) and passes any ``Found`` on as it is."""

    def __init__(self, plan: ListingPlan, keep: Optional[Callable[[Found], bool]], counted: bool):
        self.plan, self.keep, self.counted = plan, keep, counted

    def process(self, item: Union[Found, Shard]):
        if isinstance(item, Found):
            yield item
            return
        for found in list_shard(item, self.plan):
            if isinstance(found, Shard):
                if self.counted:
                    count(SHARDS)
                yield found
            elif self.keep is None or self.keep(found):
                yield found
        if self.counted:
            count(SHARDS_DONE)


class SpreadListing(beam.PTransform):
    """``Found`` objects of a PCollection of ``Shard``s (and ``Found``s, passed on): each shard is listed,
    and a large one's rest (``io.listing``) is listed at the next level, after a ``Reshuffle`` that
    spreads its shards over the workers (what was found travels with them: one PCollection, no
    ``Flatten``, whose buffers the local runner's parallel mode misreads). ``keep`` filters what shards
    list; ``counted``: the shards count in the progress line (``listing_shards``, ``listing_shards_done``)."""

    def __init__(self, plan: ListingPlan = ListingPlan(), keep: Optional[Callable[[Found], bool]] = None,
                 counted: bool = False):
        super().__init__()
        self.plan, self.keep, self.counted = plan, keep, counted

    def expand(self, items: Any):
        items = items | "Level0" >> beam.ParDo(_Expand(self.plan, self.keep, self.counted))
        for level in range(1, self.plan.levels + 1):
            items = (
                items
                | f"Spread{level}" >> beam.Reshuffle()
                | f"Level{level}" >> beam.ParDo(_Expand(self.plan, self.keep, self.counted))
            )
        return items
