"""Compaction of the captions table: many small Parquet files become a few large ones, every row once.

Pure file logic (no Beam); ``beam_captions.transforms.compact`` runs it as a job. The clip's metas is
the record of which file holds its rows (``captions_file``): rows are moved only for clips whose metas
points at the file they are in, rows a newer write superseded are dropped, and a file of a clip with no
metas (a run killed between its rows and its metas) is left where it is for the next run to replace.
Merged files that caption runs marked (``io.superseded``: a clip of theirs was written again) are
rewritten without their stale rows even when they are large.

A group is merged crash-safely and safely against writers running at the same time: the merged file is
written under a name readers ignore (``captions/.../_tmp-part-*.parquet``), a journal
(``OUT/_compact/<part>.json``) lists what it replaces with the token (``io.conditional``) of each member
and of each moved clip's metas as read, then the file is renamed into place, the members are deleted
and the clips' metas pointed at it, each only if it is still the version read. A clip written again
since (a redo during the compaction, or between a killed compaction and the next) keeps its new rows
and metas: its old rows in the merged file are marked superseded before the merged file appears. A
compaction killed part way is finished by the next one (``finish_journals``) under the same checks.

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

from beam_captions.io.conditional import file_token, remove_if_unchanged, write_if_unchanged
from beam_captions.io.done_index import mark_meta
from beam_captions.io.files import (
    UnreadableFile, delete_quietly, json_bytes, matching, parallel_map, read_json, write_bytes, write_json,
)
from beam_captions.io.metas import read_meta_with_token
from beam_captions.io.parquet import CAPTION_SCHEMA
from beam_captions.io.paths import captions_dir, meta_path
from beam_captions.io.superseded import forget_superseded, mark_superseded, merged_name, superseded_clips

__all__ = [
    "COMPACTED_PREFIX", "DEFAULT_TARGET_BYTES", "MANIFEST", "CaptionFile", "build_manifest", "finish_journals",
    "is_compacted", "list_caption_files", "merge_group", "note_planned", "pending_journals", "plan_groups",
    "progress", "read_file", "remove_stray_files", "request_stop", "reset_progress", "size_ratio", "stop_requested",
    "superseded_files", "wait_for_commits", "write_clustered",
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


def superseded_files(output: str, files: Iterable[CaptionFile]) -> set[str]:
    """The merged files among ``files`` that hold marked rows (``io.superseded``), by path."""
    marked = superseded_clips(output)
    return {f.relpath for f in files if is_compacted(f.relpath) and merged_name(f.relpath) in marked}


def plan_groups(files: Iterable[CaptionFile], target_bytes: int, ratio: float = 1.0,
                dirty: Iterable[str] = ()) -> list[list[CaptionFile]]:
    """Groups of small files to merge, per partition, each about ``target_bytes`` once merged (a file
    counts ``ratio`` of its size: see ``size_ratio``).

    Files of half the target or more are left alone, and so is a partition's lone small file: a
    second compaction of a compacted output plans nothing. A ``dirty`` file (merged, with rows a later
    write replaced: ``superseded_files``) is rewritten whatever its size, alone if need be.
    """
    dirty = set(dirty)
    by_partition: dict[str, list[CaptionFile]] = {}
    for item in files:
        if item.size < target_bytes // 2 or item.relpath in dirty:
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
    return [group for group in groups if len(group) > 1 or any(f.relpath in dirty for f in group)]


def _merged_relpath(group: Sequence[CaptionFile]) -> str:
    digest = hashlib.sha256("\n".join(f.relpath for f in group).encode("utf-8")).hexdigest()[:20]
    return posixpath.join(posixpath.dirname(group[0].relpath), f"{COMPACTED_PREFIX}{digest}.parquet")


def _read_table(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    """The rows of the Parquet file at ``path``; one that is not a caption Parquet file (damaged, truncated,
    foreign) raises ``UnreadableFile`` naming it."""
    with FileSystems.open(path) as handle:
        data = handle.read()
    try:
        return pq.read_table(pa.BufferReader(data), schema=CAPTION_SCHEMA, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        reason = next((line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()),
                      type(error).__name__)
        raise UnreadableFile(path, reason) from error


def read_file(output: str, relpath: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The rows of one file of the table (``relpath`` under the output root), with the caption schema."""
    return _read_table(_absolute(output, relpath), None if columns is None else list(columns))


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
        self.unreadable: dict[str, str] = {}  # the files the steps could not read (``note_unreadable``)


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


def note_unreadable(error: UnreadableFile) -> None:
    """A step of this process's compaction could not read a file (left as it is): its launcher names it."""
    with _PROGRESS.changed:
        _PROGRESS.unreadable.setdefault(error.path, str(error))


def unreadable_files() -> list[str]:
    """``cannot read PATH: reason`` of each file this process's compaction could not read, by path."""
    with _PROGRESS.changed:
        return [_PROGRESS.unreadable[path] for path in sorted(_PROGRESS.unreadable)]


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


def _clip_states(output: str, journal: dict) -> tuple[list[str], list[str]]:
    """The journal's clips split into those whose metas is still the version read (to re-point) and
    those written since (their rows in the merged file are stale); clips already pointing at the merged
    file (an earlier, killed commit of this journal) are in neither. A clip of a member that changed
    since it was read counts as written since."""
    merged = journal["merged"]
    changed_members = {m for m, token in journal["member_tokens"].items()
                        if m != merged and file_token(_absolute(output, m)) not in (token, None)}
    touched = {c for m in changed_members for c in journal["member_clips"].get(m, ())}

    def state(item: tuple[str, Optional[str]]) -> str:
        clip_id, token = item
        meta, now = read_meta_with_token(output, clip_id)
        if meta is not None and meta.get("captions_file") == merged:
            return "done"
        return "repoint" if now == token and clip_id not in touched else "changed"

    clips = sorted(journal["clips"].items())
    states = parallel_map(state, clips)
    return ([c for (c, _), s in zip(clips, states) if s == "repoint"],
            [c for (c, _), s in zip(clips, states) if s == "changed"])


def _repoint(output: str, merged: str, clips: dict[str, Optional[str]]) -> None:
    """Point the metas of ``clips`` at ``merged``, each only if it is still the version read (its token);
    a clip written since is marked superseded in ``merged`` instead."""

    def point(clip_id: str) -> None:
        meta, token = read_meta_with_token(output, clip_id)
        if meta is None or token != clips[clip_id]:
            mark_superseded(output, merged, clip_id)
            return
        pointed = {**meta, "captions_file": merged}
        data = json_bytes(pointed)
        if not write_if_unchanged(meta_path(output, clip_id), data, token):
            mark_superseded(output, merged, clip_id)
        else:
            mark_meta(output, pointed, data, replaces=True)  # its marker names the metas' new size

    parallel_map(point, sorted(clips))


def _commit(output: str, journal: dict) -> int:
    """Carry out a journal: the staged file into place, the members away, the clips' metas to it.

    Each member is deleted and each metas re-pointed only if it is still the version the journal read
    (``io.conditional``); a clip written since keeps its new rows and metas, and its old rows in the
    merged file are marked superseded before the merged file appears. The members go right after the
    rename (a reader of the folder sees their rows twice only between the two; ``read_captions`` never
    does); re-pointing the metas, the slow step, comes after: a crash before it is done leaves the
    journal, and the next compaction finishes it (a member already gone is no error). Returns how many
    members this call removed."""
    merged, staged = journal["merged"], journal["staged"]
    repoint, changed = _clip_states(output, journal) if merged is not None else ([], [])
    for clip_id in changed:
        mark_superseded(output, merged, clip_id)
    if merged is not None and _exists(output, staged):  # the rename replaces a file of that name
        FileSystems.rename([_absolute(output, staged)], [_absolute(output, merged)])
        from beam_captions.io.merged_rows import forget_listing  # (it imports this module)

        forget_listing(output)  # a writer of this process looks for a lost metas' rows in it too
    if merged is not None and not _exists(output, merged):
        raise RuntimeError(f"compaction journal for {merged}: neither the merged file nor its staged copy exists")
    kept_members, removed = set(), 0
    for member, token in sorted(journal["member_tokens"].items()):
        if member == merged:
            continue
        outcome = remove_if_unchanged(_absolute(output, member), token)  # None: already gone
        if outcome is False:
            kept_members.add(member)  # written since it was read: its clips' rows there are the new ones
        removed += bool(outcome)
    late = {c for m in kept_members for c in journal["member_clips"].get(m, ())}
    for clip_id in sorted(late & set(repoint)):
        mark_superseded(output, merged, clip_id)
    _repoint(output, merged, {c: journal["clips"][c] for c in sorted(set(repoint) - late)})
    for member in journal["member_tokens"]:
        if member != merged and member not in kept_members and is_compacted(member):
            forget_superseded(output, member)
    FileSystems.delete([_journal_path(output, journal["name"])])
    return removed


def merge_group(output: str, group: Sequence[CaptionFile],
                fail_after: Optional[Callable[[str], None]] = None) -> dict[str, int]:
    """Merge one planned group into ``captions/<partition>/part-<digest>.parquet`` and count what moved.

    Per file and clip: rows move when the clip's metas names that file; rows of a clip whose metas names
    another file are stale and dropped; a clip's own file with no metas is left in place (an unfinished
    clip: the next run rewrites it); rows of a clip with no metas inside a merged file are kept.
    The journal records the token of each member and of each moved clip's metas as read here.
    ``fail_after`` (tests) is called with each step's name, to stop a compaction part way.
    """
    step = fail_after or (lambda name: None)
    if stop_requested():
        return {"groups_stopped": 1}
    tokens = parallel_map(lambda item: file_token(_absolute(output, item.relpath)), group)  # before the bytes
    read = parallel_map(lambda item: _read_table(_absolute(output, item.relpath)), group)
    ids = [_clip_ids(table) for table in read]
    every_clip = sorted(set().union(*ids))
    found = dict(zip(every_clip, parallel_map(lambda clip_id: read_meta_with_token(output, clip_id), every_clip)))
    metas = {clip_id: meta for clip_id, (meta, _) in found.items()}
    tables, member_tokens, member_clips, moved_clips = [], {}, {}, {}
    stale_rows = 0
    for item, token, table, clip_ids in zip(group, tokens, read, ids):
        if not is_compacted(item.relpath) and any(metas[c] is None for c in clip_ids):
            continue  # an unfinished clip's own file: left for the run that finishes it
        keep = [c for c in clip_ids if metas[c] is None or metas[c].get("captions_file") == item.relpath]
        kept = table.filter(pc.is_in(table.column("clip_id"), pa.array(keep, pa.string())))
        stale_rows += table.num_rows - kept.num_rows
        tables.append(kept)
        member_tokens[item.relpath] = token
        member_clips[item.relpath] = [c for c in keep if metas[c] is not None]
        moved_clips.update({c: found[c][1] for c in member_clips[item.relpath]})
    if not member_tokens:
        return {"groups_skipped": 1}
    members = sorted(member_tokens)
    merged_table = pa.concat_tables(tables)
    merged = _merged_relpath([f for f in group if f.relpath in member_tokens]) if merged_table.num_rows else None
    journal = {"name": merged or _merged_relpath(group), "merged": merged,
               "staged": _staged(merged) if merged else None, "members": members,
               "member_tokens": member_tokens, "member_clips": member_clips, "clips": dict(sorted(moved_clips.items()))}
    if merged is not None:
        write_bytes(_absolute(output, journal["staged"]), write_clustered(merged_table))
        step("staged")
    try:
        with _commit_slot():
            write_json(_journal_path(output, journal["name"]), journal)
            step("journal")
            _commit(output, journal)
            if merged is not None:
                with _PROGRESS.changed:
                    _PROGRESS.committed += 1
    except _Stopped:  # stopped while this group was read and written: nothing of it is committed
        if merged is not None:
            _delete(output, [journal["staged"]])
        return {"groups_stopped": 1}
    return {"files_merged": len(members), "files_written": int(merged is not None), "rows_moved": merged_table.num_rows,
            "rows_stale_dropped": stale_rows}


def pending_journals(output: str) -> list[dict]:
    """The journals a kill left (listing or reading errors are raised: a journal is never taken for
    absent); a journal of an earlier version, without tokens, is read as one whose tokens are those
    there now."""
    journals = []
    for metadata in matching(FileSystems.join(output, _JOURNALS, "*.json")):
        journal = read_json(metadata.path)
        if "member_tokens" not in journal:
            journal["member_tokens"] = {m: file_token(_absolute(output, m)) for m in journal["members"]}
            journal["member_clips"] = {}
            journal["clips"] = {c: read_meta_with_token(output, c)[1] for c in journal["clips"]}
        journals.append(journal)
    return journals


def finish_journals(output: str, on_removed: Optional[Callable[[int], None]] = None) -> int:
    """Finish every compaction a kill left part way (its journal is still there); returns how many (a stop
    leaves the rest for the next compaction). ``on_removed`` is told how many of its merged small files
    each one removed (those the kill had not)."""
    finished = 0
    for journal in pending_journals(output):
        try:
            with _commit_slot():
                removed = _commit(output, journal)
        except _Stopped:
            break
        finished += 1
        if on_removed is not None:
            on_removed(removed)
    return finished


def remove_stray_files(output: str) -> int:
    """Delete staged merged files no journal names (a compaction killed before its journal), and markers
    of merged files that are gone."""
    journaled = {_absolute(output, j["staged"]).replace("\\", "/") for j in pending_journals(output) if j.get("staged")}
    strays = [m.path for m in matching(FileSystems.join(captions_dir(output), f"**{_STAGED_PREFIX}{COMPACTED_PREFIX}*"))
              if m.path.replace("\\", "/") not in journaled]
    for path in strays:
        FileSystems.delete([path])
    present = {merged_name(f.relpath) for f in list_caption_files(output) if is_compacted(f.relpath)}
    for name in set(superseded_clips(output)) - present:
        forget_superseded(output, f"{name}.parquet")
    return len(strays)


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
