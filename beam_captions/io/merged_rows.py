"""Which merged caption files (``compact``) hold rows of a clip, found without the clip's metas.

A clip's metas names the file of its rows (``captions_file``). When the metas is gone or cannot be read (a
partial copy, a sync tool, a truncated file), a redo of the clip must still mark its old rows in merged
files superseded (``io.superseded``), or readers would see its windows twice. Merged files are sorted by
clip and cut into row groups at clip boundaries, so each row group's ``clip_id`` statistics bound the clips
it holds: a clip id outside every range is in no merged file (no read at all), and one inside a range is
confirmed by reading that row group's ``clip_id`` column.

Per process, the merged files of an output (``captions/part-*.parquet``: a prefix listing; for a streaming
output, ``captions/**/part-*.parquet``) and their footers are read once and kept for ``LISTED_FOR_S`` seconds (a compaction in this process
makes the next call list again; one in another process is seen at the latest that much later); an output
that was never compacted costs one listing per process and nothing per clip.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.compaction import COMPACTED_PREFIX
from beam_captions.io.files import matching
from beam_captions.io.paths import captions_dir

__all__ = ["LISTED_FOR_S", "forget_listing", "merged_files_holding"]

LISTED_FOR_S = 600.0


@dataclasses.dataclass(frozen=True)
class _Merged:
    relpath: str
    path: str
    metadata: pq.FileMetaData
    ranges: tuple[tuple[Optional[str], Optional[str], int], ...]  # (lowest, highest clip id, row group)


_LOCK = threading.Lock()
_LISTED: dict[str, tuple[float, list[_Merged]]] = {}  # captions folder -> (when listed, its merged files)


def _footer(path: str, relpath: str) -> _Merged:
    with FileSystems.open(path) as handle:
        metadata = pq.ParquetFile(handle).metadata
    column = metadata.schema.names.index("clip_id")
    ranges = []
    for index in range(metadata.num_row_groups):
        stats = metadata.row_group(index).column(column).statistics
        bounded = stats is not None and stats.has_min_max
        ranges.append((stats.min if bounded else None, stats.max if bounded else None, index))
    return _Merged(relpath, path, metadata, tuple(ranges))


def _merged_files(output: str, partitioned: bool) -> list[_Merged]:
    """The merged files at the top of ``captions/`` (a prefix listing), or (``partitioned``: a streaming
    output, whose windows are folders) in any folder under it."""
    root = captions_dir(output)
    key = f"{root}/**" if partitioned else root
    now = time.monotonic()
    with _LOCK:
        listed = _LISTED.get(key)
        if listed is not None and now - listed[0] < LISTED_FOR_S:
            return listed[1]
    pattern = FileSystems.join(root, f"**{COMPACTED_PREFIX}*.parquet" if partitioned else f"{COMPACTED_PREFIX}*.parquet")
    found = []
    for match in matching(pattern):
        relpath = "captions/" + match.path.replace("\\", "/")[len(root.replace("\\", "/").rstrip("/")) + 1:]
        if relpath.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX):  # not a compaction's staged copy
            found.append(_footer(match.path, relpath))
    with _LOCK:
        _LISTED[key] = (now, found)
    return found


def forget_listing(output: str) -> None:
    """List the merged files of ``output`` again at the next call (a compaction here changed them)."""
    root = captions_dir(output)
    with _LOCK:
        for key in [key for key in _LISTED if key in (root, f"{root}/**")]:
            del _LISTED[key]


def _holds(merged: _Merged, clip_id: str, row_group: int) -> bool:
    with FileSystems.open(merged.path) as handle:
        ids = pq.ParquetFile(handle, metadata=merged.metadata).read_row_group(row_group, columns=["clip_id"])
    return clip_id in set(ids.column("clip_id").to_pylist())


def merged_files_holding(output: str, clip_id: str, partitioned: bool = False) -> list[str]:
    """The merged files holding rows of ``clip_id`` (``partitioned``: in any window folder of a streaming
    output), relative to the output root (as a metas names them)."""
    try:
        return _holding(output, clip_id, partitioned)
    except FileNotFoundError:  # a compaction elsewhere replaced a merged file since it was listed
        forget_listing(output)
        return _holding(output, clip_id, partitioned)


def _holding(output: str, clip_id: str, partitioned: bool) -> list[str]:
    holding = []
    for merged in _merged_files(output, partitioned):
        for low, high, row_group in merged.ranges:
            if (low is None or low <= clip_id) and (high is None or clip_id <= high) and _holds(merged, clip_id,
                                                                                                  row_group):
                holding.append(merged.relpath)
                break
    return holding
