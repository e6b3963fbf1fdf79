"""Compaction of the captions table: many small Parquet files become a few large ones, every row once.

Pure file logic (no Beam); ``beam_captions.transforms.compact`` runs it as a job. The clip's metas is
the record of which file holds its rows (``captions_file``): rows are moved only for clips whose metas
points at the file they are in, rows a newer write superseded are dropped, and a file of a clip with no
metas (a run killed between its rows and its metas) is left where it is for the next run to replace.

A group is merged crash-safely: the merged file is written under a name readers ignore
(``captions/.../_tmp-part-*.parquet``), a journal (``OUT/_compact/<part>.json``) lists what it replaces,
then the file is renamed into place, the small files are deleted at once (a reader of the folder sees a
row twice only between these two steps) and the clips' metas are pointed at it. A compaction killed part
way is finished by the next one (``finish_journals``).

A stop asked for in this process (``request_stop``: Ctrl-C) lets the commits under way finish and starts
no more (``wait_for_commits``), so a stopped compaction leaves every row once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import posixpath
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import delete_quietly, matching, parallel_map, read_json, write_bytes, write_json
from beam_captions.io.metas import read_meta
from beam_captions.io.parquet import CAPTION_SCHEMA
from beam_captions.io.paths import captions_dir, meta_path

__all__ = [
    "COMPACTED_PREFIX", "DEFAULT_TARGET_BYTES", "MANIFEST", "CaptionFile", "build_manifest", "finish_journals",
    "is_compacted", "list_caption_files", "merge_group", "note_planned", "plan_groups", "progress",
    "remove_clip_rows", "remove_stray_files", "request_stop", "reset_progress", "size_ratio", "stop_requested",
    "wait_for_commits", "write_clustered",
]

COMPACTED_PREFIX = "part-"
MANIFEST = "_manifest.json"  # in OUT/captions/: the leading underscore keeps it out of Parquet dataset reads
DEFAULT_TARGET_BYTES = 256 * 2**20
ROW_GROUP_ROWS = 16384  # rows per row group, cut at clip boundaries: a clip's rows are never split
_STAGED_PREFIX = "_tmp-"
_JOURNALS = "_compact"


@dataclasses.dataclass(frozen=True)
class CaptionFile:
    """One Parquet file of the captions table: its path relative to the output root and its size."""

    relpath: str
    size: int

    @property
    def partition(self) -> str:
        """The folder under ``captions/`` (``window=...`` for streaming outputs; ``""`` at the top)."""
        folder = posixpath.dirname(self.relpath)
        return folder[len("captions/"):] if folder.startswith("captions/") else ""


def _absolute(output: str, relpath: str) -> str:
    return FileSystems.join(output, *relpath.split("/"))


def _relative(output: str, path: str) -> str:
    root, path = output.rstrip("/").replace("\\", "/"), path.replace("\\", "/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path} is not under {output}")
    return path[len(root) + 1:]


def is_compacted(relpath: str) -> bool:
    """Whether ``relpath`` is a merged file (rows of many clips), not one clip's own file."""
    return posixpath.basename(relpath).startswith(COMPACTED_PREFIX)


def list_caption_files(output: str) -> list[CaptionFile]:
    """Every Parquet file a reader of ``OUT/captions`` sees (not temporaries: ``.``/``_`` names), by path."""
    found = []
    for metadata in matching(FileSystems.join(captions_dir(output), "**.parquet")):
        relpath = _relative(output, metadata.path)
        if not posixpath.basename(relpath).startswith((".", "_")):
            found.append(CaptionFile(relpath, int(metadata.size_in_bytes)))
    return sorted(found, key=lambda f: f.relpath)


def size_ratio(output: str, files: Sequence[CaptionFile], sample: int = 64) -> float:
    """How much smaller rows are once merged than in their small files (merged bytes / file bytes), from
    up to ``sample`` files spread evenly over ``files``: small files repeat a schema and per-column
    headers that a merged file has once."""
    if not files:
        return 1.0
    step = max(1, len(files) // sample)
    picked = list(files)[::step][:sample]
    tables = parallel_map(lambda f: _read_table(_absolute(output, f.relpath)), picked)
    return min(1.0, len(write_clustered(pa.concat_tables(tables))) / max(1, sum(f.size for f in picked)))


def plan_groups(files: Iterable[CaptionFile], target_bytes: int, ratio: float = 1.0) -> list[list[CaptionFile]]:
    """Groups of small files to merge, per partition, each about ``target_bytes`` once merged (a file
    counts ``ratio`` of its size: see ``size_ratio``).

    Files of half the target or more are left alone, and so is a partition's lone small file: a
    second compaction of a compacted output plans nothing.
    """
    by_partition: dict[str, list[CaptionFile]] = {}
    for item in files:
        if item.size < target_bytes // 2:
            by_partition.setdefault(item.partition, []).append(item)
    groups = []
    for partition in sorted(by_partition):
        group: list[CaptionFile] = []
        data = 0.0
        for item in sorted(by_partition[partition], key=lambda f: f.relpath):
            estimate = item.size * ratio
            if group and data + estimate > target_bytes:
                groups.append(group)
                group, data = [], 0.0
            group.append(item)
            data += estimate
        groups.append(group)
    return [group for group in groups if len(group) > 1]


def _merged_relpath(group: Sequence[CaptionFile]) -> str:
    digest = hashlib.sha256("\n".join(f.relpath for f in group).encode("utf-8")).hexdigest()[:20]
    return posixpath.join(posixpath.dirname(group[0].relpath), f"{COMPACTED_PREFIX}{digest}.parquet")


def _read_table(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    with FileSystems.open(path) as handle:
        return pq.read_table(pa.BufferReader(handle.read()), schema=CAPTION_SCHEMA, columns=columns)


def _clip_ids(table: pa.Table) -> list[str]:
    return sorted(set(table.column("clip_id").to_pylist()))


def write_clustered(table: pa.Table, rows_per_group: int = ROW_GROUP_ROWS) -> bytes:
    """``table`` sorted by clip and window as Parquet bytes, row groups cut at clip boundaries (so the
    clip_id statistics of a row group point a reader at the one group holding a clip)."""
    table = table.sort_by([("clip_id", "ascending"), ("window_index", "ascending"), ("start_frame", "ascending")])
    clip_ids = table.column("clip_id").to_pylist()
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, CAPTION_SCHEMA, compression="zstd") as writer:
        start = 0
        while start < len(clip_ids):
            end = min(start + rows_per_group, len(clip_ids))
            while end < len(clip_ids) and clip_ids[end] == clip_ids[end - 1]:
                end += 1  # finish the clip in this group
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)
            start = end
    return sink.getvalue()


def _repoint(output: str, clip_ids: Iterable[str], sources: set[str], target: str,
             known: Optional[dict[str, Optional[dict]]] = None) -> int:
    """Point the metas of ``clip_ids`` whose rows were in one of ``sources`` at ``target`` (``known``:
    metas already read, by clip id; the others are read)."""

    def repoint(clip_id: str) -> int:
        meta = known[clip_id] if known and clip_id in known else read_meta(output, clip_id)
        if meta is None or meta.get("captions_file") not in sources or meta.get("captions_file") == target:
            return 0
        write_json(meta_path(output, clip_id), {**meta, "captions_file": target})
        return 1

    return sum(parallel_map(repoint, sorted(set(clip_ids))))


def _delete(output: str, relpaths: Iterable[str]) -> None:
    delete_quietly(_absolute(output, relpath) for relpath in relpaths)


def _journal_path(output: str, merged: str) -> str:
    return FileSystems.join(output, _JOURNALS, posixpath.basename(merged)[: -len(".parquet")] + ".json")


def _staged(merged: str) -> str:
    return posixpath.join(posixpath.dirname(merged), _STAGED_PREFIX + posixpath.basename(merged))


def _exists(output: str, relpath: str) -> bool:
    return FileSystems.exists(_absolute(output, relpath))


class _Progress:
    """This process's compaction: whether a stop was asked for, the commits under way, what is done."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.reset()

    def reset(self) -> None:
        self.stop = False
        self.committing = 0
        self.committed = 0  # merged files committed (journals carried out by merge_group)
        self.planned: Optional[int] = None  # groups the plan made


_PROGRESS = _Progress()


class _Stopped(Exception):
    """A stop was asked for before this commit began."""


def request_stop() -> None:
    """Ask this process's compaction to stop: no merge or commit starts from now on; those under way finish."""
    with _PROGRESS.changed:
        _PROGRESS.stop = True
        _PROGRESS.changed.notify_all()


def stop_requested() -> bool:
    return _PROGRESS.stop


def wait_for_commits(timeout: float) -> bool:
    """Wait until no commit is under way in this process; False when ``timeout`` seconds ran out first."""
    with _PROGRESS.changed:
        return _PROGRESS.changed.wait_for(lambda: _PROGRESS.committing == 0, timeout)


def progress() -> dict[str, Any]:
    """Merged files committed in this process, groups planned (``None`` before the plan) and commits under way."""
    with _PROGRESS.changed:
        return {"committed": _PROGRESS.committed, "planned": _PROGRESS.planned, "committing": _PROGRESS.committing}


def note_planned(groups: int) -> None:
    with _PROGRESS.changed:
        _PROGRESS.planned = groups


def reset_progress() -> None:
    """Forget an earlier compaction of this process (its stop, its counts): a new one starts."""
    with _PROGRESS.changed:
        _PROGRESS.reset()


@contextlib.contextmanager
def _commit_slot() -> Iterator[None]:
    """A commit under way (journal written until it is deleted); raises ``_Stopped`` if a stop came first."""
    with _PROGRESS.changed:
        if _PROGRESS.stop:
            raise _Stopped()
        _PROGRESS.committing += 1
    try:
        yield
    finally:
        with _PROGRESS.changed:
            _PROGRESS.committing -= 1
            _PROGRESS.changed.notify_all()


def _commit(output: str, journal: dict, known: Optional[dict[str, Optional[dict]]] = None) -> None:
    """Carry out a journal: the staged file into place, the small files away, the clips' metas to it.

    The small files go right after the rename (a reader of the folder sees their rows twice only between
    the two); re-pointing the metas, the slow step, comes after: a crash before it is done leaves the
    journal, and the next compaction re-points what is left (a member already gone is no error)."""
    merged, staged = journal["merged"], journal["staged"]
    if merged is not None and _exists(output, staged):  # the rename replaces a file of that name
        FileSystems.rename([_absolute(output, staged)], [_absolute(output, merged)])
    if merged is not None and not _exists(output, merged):
        raise RuntimeError(f"compaction journal for {merged}: neither the merged file nor its staged copy exists")
    _delete(output, [m for m in journal["members"] if m != merged])
    if merged is not None:
        _repoint(output, journal["clips"], set(journal["members"]), merged, known)
    FileSystems.delete([_journal_path(output, journal["name"])])


def merge_group(output: str, group: Sequence[CaptionFile],
                fail_after: Optional[Callable[[str], None]] = None) -> dict[str, int]:
    """Merge one planned group into ``captions/<partition>/part-<digest>.parquet`` and count what moved.

    Per file and clip: rows move when the clip's metas names that file; rows of a clip whose metas names
    another file are stale and dropped; a clip's own file with no metas is left in place (an unfinished
    clip: the next run rewrites it); rows of a clip with no metas inside a merged file are kept.
    ``fail_after`` (tests) is called with each step's name, to stop a compaction part way.
    """
    step = fail_after or (lambda name: None)
    if stop_requested():
        return {"groups_stopped": 1}
    read = parallel_map(lambda item: _read_table(_absolute(output, item.relpath)), group)
    ids = [_clip_ids(table) for table in read]
    every_clip = sorted(set().union(*ids))
    metas = dict(zip(every_clip, parallel_map(lambda clip_id: read_meta(output, clip_id), every_clip)))
    tables, members, moved_clips = [], [], set()
    stale_rows = 0
    for item, table, clip_ids in zip(group, read, ids):
        if not is_compacted(item.relpath) and any(metas[c] is None for c in clip_ids):
            continue  # an unfinished clip's own file: left for the run that finishes it
        keep = [c for c in clip_ids if metas[c] is None or metas[c].get("captions_file") == item.relpath]
        kept = table.filter(pc.is_in(table.column("clip_id"), pa.array(keep, pa.string())))
        stale_rows += table.num_rows - kept.num_rows
        tables.append(kept)
        members.append(item.relpath)
        moved_clips.update(c for c in keep if metas[c] is not None)
    if not members:
        return {"groups_skipped": 1}
    merged_table = pa.concat_tables(tables)
    merged = _merged_relpath([f for f in group if f.relpath in members]) if merged_table.num_rows else None
    journal = {"name": merged or _merged_relpath(group), "merged": merged,
               "staged": _staged(merged) if merged else None, "members": members, "clips": sorted(moved_clips)}
    if merged is not None:
        write_bytes(_absolute(output, journal["staged"]), write_clustered(merged_table))
        step("staged")
    try:
        with _commit_slot():
            write_json(_journal_path(output, journal["name"]), journal)
            step("journal")
            _commit(output, journal, metas)
            if merged is not None:
                with _PROGRESS.changed:
                    _PROGRESS.committed += 1
    except _Stopped:  # stopped while this group was read and written: nothing of it is committed
        if merged is not None:
            _delete(output, [journal["staged"]])
        return {"groups_stopped": 1}
    return {"files_merged": len(members), "files_written": int(merged is not None), "rows_moved": merged_table.num_rows,
            "rows_stale_dropped": stale_rows}


def finish_journals(output: str) -> int:
    """Finish every compaction a kill left part way (its journal is still there); returns how many (a stop
    leaves the rest for the next compaction)."""
    finished = 0
    for metadata in matching(FileSystems.join(output, _JOURNALS, "*.json")):
        try:
            with _commit_slot():
                _commit(output, read_json(metadata.path))
        except _Stopped:
            break
        finished += 1
    return finished


def remove_stray_files(output: str) -> int:
    """Delete staged merged files no journal names (a compaction killed before its journal)."""
    staged = [read_json(m.path).get("staged") for m in matching(FileSystems.join(output, _JOURNALS, "*.json"))]
    journaled = {_absolute(output, relpath).replace("\\", "/") for relpath in staged if relpath}
    strays = [m.path for m in matching(FileSystems.join(captions_dir(output), f"**{_STAGED_PREFIX}{COMPACTED_PREFIX}*"))
              if m.path.replace("\\", "/") not in journaled]
    for path in strays:
        FileSystems.delete([path])
    return len(strays)


_REWRITES: dict[str, threading.Lock] = {}
_REWRITES_LOCK = threading.Lock()


def remove_clip_rows(output: str, relpath: str, clip_ids: Iterable[str]) -> None:
    """Rewrite the merged file ``relpath`` without the rows of ``clip_ids`` (delete it when none are left)
    and drop the manifest, which no longer describes the table. For clips written again after a
    compaction; the writer gathers a bundle's clips so that each merged file is rewritten once per bundle.
    Rewrites of one file in this process take turns; two workers rewriting one file at once can put back
    the other's removed rows, which the next ``compact`` drops (their metas name another file)."""
    path = _absolute(output, relpath)
    with _REWRITES_LOCK:
        lock = _REWRITES.setdefault(path, threading.Lock())
    with lock:
        if not FileSystems.exists(path):
            return
        table = _read_table(path)
        kept = table.filter(pc.invert(pc.is_in(table.column("clip_id"), pa.array(sorted(set(clip_ids)), pa.string()))))
        if kept.num_rows == table.num_rows:
            return
        if kept.num_rows:
            write_bytes(path, write_clustered(kept))
        else:
            FileSystems.delete([path])
    _delete(output, [f"captions/{MANIFEST}"])


def build_manifest(output: str, target_bytes: int) -> dict[str, Any]:
    """``OUT/captions/_manifest.json``: every file of the table with its rows, clips and size; the
    totals; the schema. Written by ``compact``; a later write of a compacted clip removes it."""

    def describe(item: CaptionFile) -> dict[str, Any]:
        clip_ids = _read_table(_absolute(output, item.relpath), ["clip_id"]).column("clip_id")
        return {"path": item.relpath, "bytes": item.size, "rows": len(clip_ids),
                "clips": len(set(clip_ids.to_pylist())), "_ids": set(clip_ids.to_pylist())}

    files = parallel_map(describe, list_caption_files(output))
    clips = set().union(*(f.pop("_ids") for f in files)) if files else set()
    manifest = {
        "version": 1,
        "files": files,
        "rows": sum(f["rows"] for f in files),
        "clips": len(clips),
        "target_bytes": target_bytes,
        "schema": [{"name": field.name, "type": str(field.type)} for field in CAPTION_SCHEMA],
    }
    write_json(FileSystems.join(captions_dir(output), MANIFEST), manifest)
    return manifest
