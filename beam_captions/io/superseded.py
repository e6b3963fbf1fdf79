"""Markers of rows in merged caption files that a later write may have replaced.

A merged file (``captions/[<partition>/]part-<digest>.parquet``, made by ``compact``) is never rewritten
by a caption run. When a run writes a clip whose rows are in one, it first leaves a marker
``OUT/_compact/superseded/<part-digest>/<clip_id>.json``, then writes the clip's own file and its metas.
A marker says only "look at this clip's metas": the rows in the merged file still count while the metas
names that file (a write that died before its metas), and stop counting once it names another. Readers
(``read_captions``) and the next compaction (which rewrites every marked merged file without its stale
rows, then removes the markers) check the metas of marked clips only, so a compacted table is read
without reading every clip's metas.
"""

from __future__ import annotations

import posixpath

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import delete_quietly, matching, write_json

__all__ = ["forget_superseded", "mark_superseded", "merged_name", "superseded_clips"]

_FOLDER = ("_compact", "superseded")


def _stem(merged_relpath: str) -> str:
    return posixpath.basename(merged_relpath)[: -len(".parquet")]


def mark_superseded(output: str, merged_relpath: str, clip_id: str) -> None:
    """Note that the rows of ``clip_id`` in the merged file ``merged_relpath`` may be replaced."""
    path = FileSystems.join(output, *_FOLDER, _stem(merged_relpath), f"{clip_id}.json")
    write_json(path, {"merged": merged_relpath, "clip_id": clip_id})


def superseded_clips(output: str) -> dict[str, set[str]]:
    """The marked clips of each merged file, by the file's name (``part-<digest>``)."""
    found: dict[str, set[str]] = {}
    for metadata in matching(FileSystems.join(output, *_FOLDER, "*", "*.json")):
        parts = metadata.path.replace("\\", "/").split("/")
        found.setdefault(parts[-2], set()).add(parts[-1][: -len(".json")])
    return found


def forget_superseded(output: str, merged_relpath: str) -> None:
    """Remove the markers of a merged file that is gone (compaction replaced it)."""
    folder = FileSystems.join(output, *_FOLDER, _stem(merged_relpath))
    delete_quietly(m.path for m in matching(FileSystems.join(folder, "*.json")))


def merged_name(relpath: str) -> str:
    """The key of ``superseded_clips`` for the merged file ``relpath``."""
    return _stem(relpath)
