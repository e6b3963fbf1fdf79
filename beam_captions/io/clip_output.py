"""One clip's outputs under the output root: its failure records, its Parquet rows (or staged Delta rows), its
metas last, then the clean-up of what an earlier write of it left (``write_clip``)."""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Any, Iterable, Optional, Union

from apache_beam.io.filesystems import FileSystems

from beam_captions.arrival import version_of
from beam_captions.io.compaction import MANIFEST, is_compacted
from beam_captions.io.delta import DELTA, PARQUET, stage_rows
from beam_captions.io.done_index import mark_meta
from beam_captions.io.files import delete_quietly, json_bytes, matching, parse_json_object, write_bytes, write_json
from beam_captions.io.lease_keeper import touch as touch_lease
from beam_captions.io.merged_rows import merged_files_holding
from beam_captions.io.metas import (
    CAPTION_GROUP, PREVIEW_GROUP, clip_meta, failure_meta, finished_for, merge_windows, same_version,
    window_meta,
)
from beam_captions.io.parquet import caption_row, parquet_bytes
from beam_captions.io.paths import caption_table_path, captions_dir, failure_path, failures_dir, meta_path, previews_dir
from beam_captions.io.superseded import mark_superseded
from beam_captions.metrics import count
from beam_captions.records import ClipInfo, Failure, WindowRecord

__all__ = ["write_clip"]

Element = Union[ClipInfo, WindowRecord, Failure]

log = logging.getLogger(__name__)


def _count_row(record: WindowRecord) -> None:
    count("windows")
    if record.caption:
        count("captions")
        count("caption_prompt_tokens", record.caption_prompt_tokens or 0)
    for check in record.checks().values():
        for flag in check.flags if check else ():
            count(f"flagged_{flag}")


def _captions_file(clip_id: str, partition: Optional[str]) -> str:
    """The clip's Parquet file relative to the output root (as recorded in its metas)."""
    return "/".join(["captions", *([partition] if partition else []), f"{clip_id}.parquet"])


def _earlier_meta(output: str, clip_id: str) -> tuple[Optional[dict[str, Any]], bool]:
    """The clip's metas from an earlier write (None: none), and whether one is there that cannot be read (a
    truncated or foreign file). Reading errors are raised."""
    path = meta_path(output, clip_id)
    if not FileSystems.exists(path):
        return None, False
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except FileNotFoundError:  # deleted between the two calls
        return None, False
    meta = parse_json_object(data)
    return meta, meta is None


def write_clip(
    output: str,
    clip_id: str,
    elements: Iterable[Element],
    partition: Optional[str] = None,
    asked: Optional[dict[str, Any]] = None,
    captions_table: str = PARQUET,
) -> bool:
    """Write one clip's failure records, its Parquet rows, then its metas (the marker that it is done);
    then remove what an earlier write of the clip left that this one replaces. Returns whether it wrote.

    ``captions_table="delta"``: the rows go to a staged file (``io.delta.stage_rows``), which the metas
    names (``captions_staged``) for the job's committer (``io.delta_committer``) to commit to the Delta
    table; a clip without rows gets an (empty) staged file too, so that its commit removes any it had there.

    ``partition`` (streaming: the event-time window) puts the rows in ``captions/<partition>/``.
    ``asked`` is what the run makes (``outputs`` in the metas): outputs of the clip's earlier metas that
    this run does not make (previews, or captions) are kept if the source is the same version; the rest
    (rows in another partition, previews of windows that are gone, failure records) is replaced. A write
    that is not complete (failures, missing windows) never replaces a complete result of the same source
    version that has every output asked: it is a late duplicate and is dropped.

    A merged file (``compact``) is never changed: a clip whose rows are in one is marked superseded
    there (``io.superseded``) before its own file and metas are written; readers that go through the
    metas (``read_captions``) see its new rows only, and the next compaction drops the old ones.
    """
    touch_lease(output)  # a job's worker that runs none of its first steps keeps its lease fresh too
    asked = dict(asked or {})
    elements = list(elements)
    infos = [e for e in elements if isinstance(e, ClipInfo)]
    by_index: dict[int, WindowRecord] = {}
    for element in elements:  # a window delivered twice (a retried bundle, a re-reported file) counts once
        if isinstance(element, WindowRecord):
            by_index.setdefault(element.window_index, element)
    windows = [by_index[i] for i in sorted(by_index)]
    all_failures = [e for e in elements if isinstance(e, Failure)] + [f for w in windows for f in w.failures]
    failures = list({f.name: f for f in all_failures}.values())
    version = version_of(elements)
    old, unreadable = _earlier_meta(output, clip_id)
    if unreadable:
        log.warning("the metas of clip %s (%s) could not be read; the clip is made again and its earlier rows "
                    "are superseded", clip_id, meta_path(output, clip_id))
    same_source = old is not None and same_version(old.get("source_version"), version)
    complete = bool(infos) and not failures
    if not complete and same_source and old.get("status") == "done" and finished_for(old, asked, version, True):
        count("duplicates_dropped")
        return False
    window_metas, outputs = merge_windows([window_meta(w) for w in windows], old if same_source else None, asked)
    before = None
    if old is not None:
        before = old.get("captions_file") if "captions_file" in old else (
            _captions_file(clip_id, None) if old.get("windows") else None)
    stale = [before] if before and is_compacted(before) else []
    if old is None and captions_table != DELTA:  # no metas names its file (none, or lost): look in merged files
        stale = merged_files_holding(output, clip_id, partitioned=partition is not None)
    for merged_file in stale:  # before any new row: a reader then checks this clip's metas
        mark_superseded(output, merged_file, clip_id)
    if stale:
        delete_quietly([FileSystems.join(captions_dir(output), MANIFEST)])  # it no longer lists every file
    for failure in failures:
        count(f"failures_{failure.stage}")
        write_json(failure_path(output, failure.name), failure_meta(failure))
    keep = {f"{failure.name}.json" for failure in failures}
    delete_quietly(m.path for m in matching(FileSystems.join(failures_dir(output), f"{clip_id}_*.json"))
                   if posixpath.basename(m.path.replace(os.sep, "/")) not in keep)
    captions_file = staged = None
    if windows:
        rows = []
        for record, merged in zip(windows, window_metas):
            row = caption_row(record)
            row.update({key: merged.get(key) for key in (*CAPTION_GROUP, *PREVIEW_GROUP)})
            rows.append(row)
        if captions_table == DELTA:
            staged = stage_rows(output, clip_id, rows)
        else:
            write_bytes(caption_table_path(output, clip_id, partition), parquet_bytes(rows))
            captions_file = _captions_file(clip_id, partition)
        for record in windows:  # counted once written: the summary counts outcomes, not attempts
            _count_row(record)
    elif captions_table == DELTA:  # its commit removes whatever rows of the clip the table holds
        staged = stage_rows(output, clip_id, [])
    meta = clip_meta(clip_id, elements[0].source, infos[0] if infos else None, window_metas, failures,
                     source_version=version, outputs=outputs, captions_file=captions_file)
    count("clips")
    if meta["status"] == "failed":  # whatever stage failed it: the summary's ``clips failed`` is what metas say
        count("clips_failed")
    if captions_table == DELTA:  # the committer finds the rows of the clip the table holds (io.delta_committer)
        meta.update(captions_table=DELTA, captions_staged=staged)
    data = json_bytes(meta)
    write_bytes(meta_path(output, clip_id), data, "application/json")
    mark_meta(output, meta, data, replaces=old is not None)  # the done index: after the metas it describes
    # after the metas: a crash before this leaves an extra file, never a clip without rows
    if before and before != captions_file and before.endswith(f"/{clip_id}.parquet"):  # the clip's own old file
        delete_quietly([FileSystems.join(output, *before.split("/"))])
    previews = {posixpath.basename(str(w["preview"]).replace(os.sep, "/")) for w in window_metas if w.get("preview")}
    delete_quietly(m.path for m in matching(FileSystems.join(previews_dir(output), clip_id, "*.webp"))
                   if posixpath.basename(m.path.replace(os.sep, "/")) not in previews)
    return True
