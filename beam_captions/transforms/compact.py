"""CompactCaptions: merge an output's small caption files into large ones, as a Beam job."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, TypeVar

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.compaction import (
    DEFAULT_TARGET_BYTES, MANIFEST, CaptionFile, build_manifest, finish_journals, list_caption_files, merge_group, note_planned,
    note_unreadable, plan_groups, remove_stray_files, size_ratio, stop_requested, superseded_files,
)
from beam_captions.io.files import UnreadableFile, delete_quietly
from beam_captions.io.partitions import read_settings
from beam_captions.io.paths import captions_dir
from beam_captions.metrics import count

__all__ = ["CompactCaptions"]

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")


def _unless_unreadable(step: Callable[[], _T], instead: _T) -> _T:
    """``step()``, or ``instead`` when a file of the output cannot be read (damaged): the file is left as it is,
    counted (``files_unreadable``) and noted for the launcher (``io.compaction.note_unreadable``), and the
    compaction goes on with the rest (its launcher then exits 1, naming the file)."""
    try:
        return step()
    except UnreadableFile as error:
        _LOG.info("compaction: %s; left as it is", error)
        count("files_unreadable")
        note_unreadable(error)
        return instead


def _plan(output: str, target_bytes: int):
    """Finish compactions a kill left part way, then yield the groups of files to merge (none once a stop
    was asked for in this process)."""
    count("compactions_finished", finish_journals(output, lambda removed: count("leftover_files_removed", removed)))
    if stop_requested():
        return
    count("staged_files_removed", remove_stray_files(output))
    files = list_caption_files(output)
    count("files_before", len(files))
    streaming = read_settings(output)
    if streaming is not None:  # a streaming output: partitions the job may still write are left alone
        files = [f for f in files if streaming.is_closed(f.partition)]
    small = [f for f in files if f.size < target_bytes // 2]
    ratio = _unless_unreadable(lambda: size_ratio(output, small), 1.0)
    groups = plan_groups(files, target_bytes, ratio, superseded_files(output, files))
    note_planned(len(groups))
    if not stop_requested():
        yield from groups


def _merge(group: list[CaptionFile], output: str) -> dict[str, int]:
    done = _unless_unreadable(lambda: merge_group(output, group), {"groups_unreadable": 1})
    for name, value in done.items():
        count(name, value)
    return done


def _manifest(_totals: Any, output: str, target_bytes: int) -> dict[str, Any]:
    if stop_requested():  # stopped part way: the next compaction writes it
        return {}
    manifest = _unless_unreadable(lambda: build_manifest(output, target_bytes), None)
    if manifest is None:  # a file of the table cannot be read: no manifest, as it would not list every row
        delete_quietly([FileSystems.join(captions_dir(output), MANIFEST)])
        count("files_after", len(list_caption_files(output)))
        return {}
    count("files_after", len(manifest["files"]))
    count("rows", manifest["rows"])
    count("clips_in_table", manifest["clips"])
    return manifest


class CompactCaptions(beam.PTransform):
    """Merge the small Parquet files under ``OUT/captions`` (per partition) into files of about
    ``target_bytes``, rows sorted by clip and row groups cut at clip boundaries; then write
    ``OUT/captions/_manifest.json``. Idempotent, and safe while jobs write to ``output``: a write during
    a compaction keeps its rows (``io.compaction``), and on a streaming output only partitions closed
    past the job's lateness horizon are merged (``io.partitions``).

    Groups are merged in parallel (one group per worker at a time); the manifest is written when
    every group is done.
    """

    def __init__(self, output: str, target_bytes: Optional[int] = None):
        super().__init__()
        self.output = output
        self.target_bytes = target_bytes or DEFAULT_TARGET_BYTES

    def expand(self, pbegin):
        merged = (
            pbegin
            | "Output" >> beam.Create([self.output])
            | "Plan" >> beam.FlatMap(_plan, self.target_bytes)
            | "Spread" >> beam.Reshuffle()
            | "Merge" >> beam.Map(_merge, self.output)
        )
        return (
            merged
            | "AllMerged" >> beam.combiners.Count.Globally()
            | "Manifest" >> beam.Map(_manifest, self.output, self.target_bytes)
        )
