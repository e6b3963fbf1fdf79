"""The done index: one empty marker per clip beside the metas (``OUT/done/``), whose *name* says what the
clip's metas says, so that one listing of ``OUT/done/`` and ``OUT/metas/`` (1,000 names a request on
gs://) tells a run which clips are finished, without reading a metas per clip.

A marker is ``<clip id>.<metas size>.<status>.<version digest>.<output digest>...``: the size in bytes
of the metas it describes, the clip's ``status``, a digest of its ``source_version`` and one digest per
output it has (name and settings, as in ``outputs``). Every writer of a metas (``write_clip``, compaction's
re-pointing) puts it right after the metas, then removes the clip's earlier markers.

The metas stays the source of truth. A clip counts as finished from the index alone only where the
listing shows its metas with the very size its marker names, a version digest equal to that of the
version listed now, and a digest for every output asked (``failed`` counts only with
``--no-retry-failed``). Anything else (no marker, another size: a metas rewritten, truncated or
replaced by hand, another version or output) is a "closer look": the run reads that metas and decides
by it, as without an index, and where it is finished writes the marker it lacked. A marker whose metas
is gone counts for nothing: the clip is made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any, Iterable, NamedTuple, Optional

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import delete_quietly, matching, write_bytes
from beam_captions.io.metas import version_meta
from beam_captions.records import SourceVersion

__all__ = ["DONE", "FINISHED", "LOOK", "NEW", "Marker", "done_dir", "index_verdict", "mark_done", "mark_meta",
           "marker_name", "parse_marker"]

DONE = "done"
FINISHED, LOOK, NEW = "finished", "look", "new"  # the index's verdicts


def done_dir(output: str) -> str:
    return FileSystems.join(output, DONE)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _output_digests(outputs: dict[str, Any]) -> list[str]:
    return sorted(_digest([name, made_by]) for name, made_by in outputs.items())


def marker_name(clip_id: str, metas_size: int, status: str, recorded_version: Any, outputs: dict[str, Any]) -> str:
    """The marker of a metas of ``metas_size`` bytes saying ``status``, ``recorded_version`` (as
    ``version_meta`` gives it) and ``outputs``."""
    return ".".join([clip_id, str(int(metas_size)), status, _digest(recorded_version), *_output_digests(outputs)])


class Marker(NamedTuple):
    """What one marker's name says."""

    clip_id: str
    metas_size: int
    status: str
    version: str
    outputs: frozenset[str]


def parse_marker(name: str) -> Optional[Marker]:
    """The marker a file name is, ``None`` for any other name (a temporary file, a foreign one)."""
    parts = posixpath.basename(name.replace(os.sep, "/")).split(".")
    if len(parts) < 4 or not parts[1].isdigit() or parts[2] not in ("done", "failed"):
        return None
    return Marker(parts[0], int(parts[1]), parts[2], parts[3], frozenset(parts[4:]))


def mark_done(output: str, clip_id: str, metas_size: int, status: str, recorded_version: Any,
              outputs: dict[str, Any], replaces: bool) -> None:
    """Write the marker of a metas written as ``metas_size`` bytes; where it ``replaces`` an earlier metas
    of the clip, then remove the clip's other markers."""
    name = marker_name(clip_id, metas_size, status, recorded_version, outputs)
    write_bytes(FileSystems.join(done_dir(output), name), b"")
    if replaces:
        delete_quietly(m.path for m in matching(FileSystems.join(done_dir(output), f"{clip_id}.*"))
                       if posixpath.basename(m.path.replace(os.sep, "/")) != name)


def mark_meta(output: str, meta: dict[str, Any], data: bytes, replaces: bool) -> None:
    """``mark_done`` for ``meta``, written as ``data``."""
    mark_done(output, meta["clip_id"], len(data), meta.get("status", ""), meta.get("source_version"),
              meta.get("outputs") or {}, replaces)


def index_verdict(metas_size: Optional[int], markers: Iterable[Marker], asked: dict[str, Any],
                  version: Optional[SourceVersion], retry_failed: bool) -> str:
    """``FINISHED`` (skip without reading the metas), ``NEW`` (no metas: nothing to read) or ``LOOK``
    (read the metas and decide by it) for a clip whose metas the listing found with ``metas_size``
    bytes (``None``: none) and ``markers``, listed now at ``version``."""
    if metas_size is None:
        return NEW
    if version is None:
        return LOOK
    wanted_version = _digest(version_meta(version))
    wanted_outputs = set(_output_digests(asked))
    for marker in markers:
        if marker.metas_size != metas_size or marker.version != wanted_version:
            continue
        if marker.status == "failed" and not retry_failed:
            return FINISHED
        if marker.status == "done" and wanted_outputs <= marker.outputs:
            return FINISHED
    return LOOK
