"""The captions table as a Delta Lake table (``--captions-table delta``), written with delta-rs (``deltalake``).

``OUT/captions`` is a Delta table with the rows of ``io.parquet.CAPTION_SCHEMA`` (not partitioned). Writing
it takes two steps, so that a clip is durable the moment it is finished and the table gets few, large
commits:

1. **Staging** (``stage_rows``, called by ``write_clip`` per clip, on the worker that finished it): the
   clip's rows go to ``OUT/_delta_staging/<clip_id>-<uuid>.parquet`` (a whole-file write, outside the
   table), then its metas records ``captions_table: "delta"`` and ``captions_staged`` (that file). A clip
   whose metas exists is done: its rows are durable, the table shows them after the next commit.
2. **Commit** (``commit_clips``, one committer step of the job, a batch of clips at a time): the staged
   file each clip's metas names now (its newest write) is read, and the batch's rows go into the table in
   ONE Delta transaction; then the staged files are deleted. A batch of clips never written before is
   appended (no scan of the table); a batch with a clip that may have rows there already (an earlier
   metas, a retried commit, a recovery) replaces every row of its clips (``predicate: clip_id IN
   (...)``, delta-rs's replaceWhere): a redo with fewer windows leaves none of the old ones, and
   committing the same staged file twice leaves its rows once. A commit that loses a race to another
   writer (delta-rs ``CommitFailedError``) is retried on the new version of the table, with backoff.

A committer killed between its commit and the deletion of the staged files leaves a journal
(``OUT/_delta_staging/_commits/<digest>.json``): whoever commits those files next replaces instead of
appending. Staged files a job left uncommitted (killed before its commit) are committed by the next run
before it starts and by ``beam-captions compact`` (``commit_leftovers``); a staged file no metas names is
an unfinished or superseded write, deleted once it is ``STALE_STAGED_S`` old.

``compact_table`` is ``beam-captions compact`` on such an output: delta-rs's own optimize (compaction),
vacuum and log clean-up. ``read_table`` reads the table (``read_captions`` uses it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import random
import time
import uuid
from typing import Any, Callable, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import delete_quietly, matching, parallel_map, read_json, write_bytes, write_json
from beam_captions.io.metas import read_meta
from beam_captions.io.parquet import CAPTION_SCHEMA, parquet_bytes
from beam_captions.io.paths import captions_dir, is_local, local_path

__all__ = [
    "BATCH_CLIPS", "DELTA", "PARQUET", "STAGING", "TABLE_FORMATS", "commit_clips", "commit_leftovers",
    "compact_table", "ensure_table", "has_delta_log", "other_format_error", "output_format", "prepare_output",
    "read_table", "stage_rows", "staged_files", "storage_options", "table_uri",
]

DELTA, PARQUET = "delta", "parquet"
TABLE_FORMATS = (PARQUET, DELTA)
STAGING = "_delta_staging"  # under the output root, outside the table: vacuum never sees it
_JOURNALS = "_commits"  # under STAGING: commits under way (their staged files may be in the table already)
BATCH_CLIPS = 200  # clips per commit (the committer step's batch size)
STALE_STAGED_S = 6 * 3600.0  # a staged file no metas names, this old, is a dead write
COMMIT_ATTEMPTS = 12
DEFAULT_RETENTION_HOURS = 168  # vacuum: files a reader of a week-old version may still need stay
_LOG = logging.getLogger("beam_captions")


# ------------------------------------------------------------------------------------------- locations


def table_uri(output: str) -> str:
    """The Delta table's location: ``OUT/captions`` (an absolute local path, or the gs:// URI)."""
    location = captions_dir(output)
    return os.path.abspath(local_path(location)) if is_local(location) else location


def storage_options(output: str) -> Optional[dict[str, str]]:
    """delta-rs (object_store) settings for ``output``: none locally; on gs:// the credentials object_store
    finds itself (``GOOGLE_APPLICATION_CREDENTIALS``, ``GOOGLE_SERVICE_ACCOUNT``, the metadata server of a
    GCE or Dataflow worker), or, with ``STORAGE_EMULATOR_HOST`` set, that emulator without credentials (it
    must speak GCS's XML API, as fake-gcs-server does; gcp-storage-emulator does not)."""
    if is_local(output):
        return None
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if output.startswith("gs://") and emulator:
        base = emulator if "://" in emulator else f"http://{emulator}"
        return {"google_base_url": base, "google_skip_signature": "true", "allow_http": "true"}
    return None


def staging_dir(output: str) -> str:
    return FileSystems.join(output, STAGING)


def _absolute(output: str, relpath: str) -> str:
    return FileSystems.join(output, *relpath.split("/"))


def _first(pattern: str) -> bool:
    """Whether anything matches ``pattern`` (the listing stops at the first; a listing error is raised)."""
    return any(result.metadata_list for result in FileSystems.match([pattern], limits=[1]))


def has_delta_log(output: str) -> bool:
    """Whether ``OUT/captions`` is a Delta table (its ``_delta_log/`` has a file)."""
    log = FileSystems.join(captions_dir(output), "_delta_log")
    if is_local(output):
        folder = local_path(log)
        return os.path.isdir(folder) and any(True for _ in os.scandir(folder))
    return _first(FileSystems.join(log, "*"))


def output_format(output: str) -> Optional[str]:
    """The captions table format ``output`` holds: ``delta`` (a Delta log, or staged files), ``parquet``
    (Parquet files under ``captions/`` and no Delta log), or ``None`` (no rows yet)."""
    if has_delta_log(output) or _first(FileSystems.join(staging_dir(output), "*.parquet")):
        return DELTA
    if is_local(output):
        root = local_path(captions_dir(output))
        for _folder, _dirs, names in os.walk(root):
            if any(name.endswith(".parquet") and not name.startswith((".", "_")) for name in names):
                return PARQUET
        return None
    return PARQUET if _first(FileSystems.join(captions_dir(output), "**.parquet")) else None


def other_format_error(output: str, wanted: str) -> Optional[str]:
    """Why a run with ``--captions-table wanted`` must not write to ``output`` (it holds the other format),
    or ``None``: a run never mixes plain Parquet files and a Delta table under ``OUT/captions``."""
    found = output_format(output)
    if found is None or found == wanted:
        return None
    held = "a Delta table (captions/_delta_log)" if found == DELTA else "a plain Parquet table (captions/*.parquet)"
    return f"--captions-table {wanted}: {output} already holds {held}; give --captions-table {found} or another --output"


# ---------------------------------------------------------------------------------------------- staging


def stage_rows(output: str, clip_id: str, rows: list[dict[str, Any]]) -> str:
    """Write one clip's rows to a new staged file (whole-file write); returns its path under the output root."""
    name = f"{clip_id}-{uuid.uuid4().hex}.parquet"
    write_bytes(FileSystems.join(staging_dir(output), name), parquet_bytes(rows))
    return f"{STAGING}/{name}"


def staged_files(output: str) -> list[tuple[str, str, float]]:
    """Every staged file: (path under the output root, its clip id, last modified in s since the epoch)."""
    found = []
    for metadata in matching(FileSystems.join(staging_dir(output), "*.parquet")):
        name = posixpath.basename(metadata.path.replace("\\", "/"))
        if name.startswith((".", "_")):
            continue
        clip_id = name[: -len(".parquet")].rsplit("-", 1)[0]
        found.append((f"{STAGING}/{name}", clip_id, float(metadata.last_updated_in_seconds or 0.0)))
    return sorted(found)


def _delete(output: str, relpaths: Sequence[str]) -> None:
    """Delete staged files (those gone already are no error); locally without Beam's per-path glob match."""
    if not is_local(output):
        delete_quietly(_absolute(output, relpath) for relpath in relpaths)
        return
    for relpath in relpaths:
        try:
            os.unlink(local_path(_absolute(output, relpath)))
        except FileNotFoundError:
            pass


def _read_staged(output: str, relpath: str) -> Optional[pa.Table]:
    """The rows of a staged file, or ``None`` when it is gone (committed and deleted already)."""
    path = _absolute(output, relpath)
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except Exception:  # noqa: BLE001 - a missing file raises different errors per filesystem
        if not FileSystems.exists(path):
            return None
        raise
    return pq.read_table(pa.BufferReader(data), schema=CAPTION_SCHEMA)


# ----------------------------------------------------------------------------------------------- table


def _is_conflict(error: BaseException) -> bool:
    from deltalake.exceptions import CommitFailedError

    return isinstance(error, CommitFailedError)


def ensure_table(output: str):
    """The Delta table at ``OUT/captions``, made (empty, ``CAPTION_SCHEMA``) if there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri, options = table_uri(output), storage_options(output)
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return DeltaTable(uri, storage_options=options)
        except TableNotFoundError:
            pass
        try:
            return DeltaTable.create(uri, CAPTION_SCHEMA, mode="ignore", storage_options=options,
                                     name="captions", description="beam-captions: one row per caption window")
        except Exception as error:  # noqa: BLE001 - another writer made it at the same moment: open theirs
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            _LOG.info("making the Delta table %s: %s; trying again", uri, error)
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _writer_properties():
    """Data files as the plain Parquet output writes them: zstd."""
    from deltalake import WriterProperties

    return WriterProperties(compression="ZSTD")


def _backoff(attempt: int) -> float:
    return min(5.0, 0.05 * 2**attempt) * (0.5 + random.random())


def _in_list(clip_ids: Iterable[str]) -> str:
    return ", ".join("'" + clip_id.replace("'", "''") + "'" for clip_id in clip_ids)


def _commit(output: str, data: pa.Table, clip_ids: Sequence[str], replace: bool,
            before_commit: Optional[Callable[[int], None]] = None) -> int:
    """Commit ``data`` (rows of ``clip_ids``) in one transaction; returns how many attempts it took.

    ``replace``: every row of ``clip_ids`` in the table is replaced by ``data`` (delta-rs overwrite with a
    predicate: the files holding them are rewritten without them, in the same commit that adds ``data``);
    else ``data`` is appended. A lost race (``CommitFailedError``) is tried again on a fresh snapshot.
    ``before_commit(attempt)`` (tests) runs after the snapshot is loaded, right before the commit.
    """
    from deltalake import CommitProperties, write_deltalake

    properties = CommitProperties(custom_metadata={
        "beam-captions.operation": "replace" if replace else "append", "beam-captions.clips": str(len(clip_ids))})
    for attempt in range(COMMIT_ATTEMPTS):
        table = ensure_table(output)
        if before_commit is not None:
            before_commit(attempt)
        try:
            if replace:
                write_deltalake(table, data, mode="overwrite", predicate=f"clip_id IN ({_in_list(clip_ids)})",
                                commit_properties=properties, writer_properties=_writer_properties())
            else:
                write_deltalake(table, data, mode="append", commit_properties=properties,
                                writer_properties=_writer_properties())
            return attempt + 1
        except Exception as error:  # noqa: BLE001
            if not _is_conflict(error) or attempt == COMMIT_ATTEMPTS - 1:
                raise
            _LOG.info("Delta commit of %d clips lost a race (%s); trying again", len(clip_ids),
                      str(error).splitlines()[0])
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _journal_path(output: str, staged: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(staged)).encode("utf-8")).hexdigest()[:24]
    return FileSystems.join(staging_dir(output), _JOURNALS, f"{digest}.json")


def commit_clips(output: str, clip_ids: Iterable[str], *, recovery: bool = False,
                 before_commit: Optional[Callable[[int], None]] = None) -> dict[str, int]:
    """Commit the staged rows of ``clip_ids`` to the Delta table in one transaction, then delete their
    staged files. Per clip, the staged file its metas names now is committed (its newest write); a clip
    whose named file is gone was committed already. ``recovery``: the files may have been committed before
    (a commit killed before its clean-up): replace, never append. Returns counters."""
    ids = sorted(set(clip_ids))

    def staged_of(clip_id: str) -> tuple[Optional[dict], Optional[str], Optional[pa.Table]]:
        meta = read_meta(output, clip_id)
        if not (isinstance(meta, dict) and meta.get("captions_table") == DELTA and meta.get("captions_staged")):
            return meta, None, None
        return meta, meta["captions_staged"], _read_staged(output, meta["captions_staged"])

    found = dict(zip(ids, parallel_map(staged_of, ids)))
    metas = {clip_id: meta for clip_id, (meta, _, _) in found.items()}
    named = {clip_id: relpath for clip_id, (_, relpath, _) in found.items() if relpath}
    tables = {clip_id: table for clip_id, (_, _, table) in found.items() if table is not None}
    present = sorted(tables)
    if not present:
        return {"delta_clips_already_committed": len(named)} if named else {}
    staged = [named[clip_id] for clip_id in present]
    journal = _journal_path(output, staged)
    retried = FileSystems.exists(journal)  # a commit of these files began before: it may have gone through
    write_json(journal, {"staged": staged})
    replace = recovery or retried or any(metas[c].get("captions_replaces", True) for c in present)
    data = pa.concat_tables([tables[clip_id] for clip_id in present])
    attempts = _commit(output, data, present, replace, before_commit)
    _delete(output, staged)
    delete_quietly([journal])
    return {"delta_commits": 1, "delta_clips_committed": len(present), "delta_rows_committed": data.num_rows,
            "delta_commit_retries": attempts - 1, "delta_commits_replacing": int(replace),
            **({"delta_clips_already_committed": len(named) - len(present)} if len(named) > len(present) else {})}


def commit_leftovers(output: str, batch_clips: int = BATCH_CLIPS, stale_s: float = STALE_STAGED_S,
                     now: Optional[float] = None) -> dict[str, int]:
    """Commit the staged files a job left (killed before its commit): those a clip's metas names, in
    batches, replacing (they may be in the table already). A staged file no metas names is an unfinished
    write (its metas not written yet) or one a newer write superseded: deleted once ``stale_s`` old.
    Journals of commits whose files are all gone are removed. Run it while no other job commits to
    ``output`` (the launcher does, holding the output's lease)."""
    now = time.time() if now is None else now
    found = staged_files(output)
    totals: dict[str, int] = {}
    if found:
        clip_ids = sorted({clip_id for _, clip_id, _ in found})
        metas = dict(zip(clip_ids, parallel_map(lambda clip_id: read_meta(output, clip_id), clip_ids)))
        named = {(meta or {}).get("captions_staged") for meta in metas.values()}
        wanted = sorted({clip_id for relpath, clip_id, _ in found if relpath in named})
        for start in range(0, len(wanted), batch_clips):
            for name, value in commit_clips(output, wanted[start:start + batch_clips], recovery=True).items():
                totals[name] = totals.get(name, 0) + value
        dead = [relpath for relpath, _, modified in found if relpath not in named and now - modified >= stale_s]
        _delete(output, dead)
        if dead:
            totals["delta_staged_removed"] = len(dead)
    for metadata in matching(FileSystems.join(staging_dir(output), _JOURNALS, "*.json")):
        journal = read_json(metadata.path)
        if not any(FileSystems.exists(_absolute(output, relpath)) for relpath in journal.get("staged", [])):
            delete_quietly([metadata.path])
    return totals


def prepare_output(output: str) -> dict[str, int]:
    """Before a job's pipeline starts (the launcher, holding the output): make the table if there is none,
    and commit what an earlier job left staged (``commit_leftovers``). Returns its counters."""
    ensure_table(output)
    return commit_leftovers(output)


# ------------------------------------------------------------------------------------- reading, compact


def read_table(output: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Every row of the Delta table at ``OUT/captions`` (its latest version), with ``CAPTION_SCHEMA``'s types."""
    from deltalake import DeltaTable

    table = DeltaTable(table_uri(output), storage_options=storage_options(output)).to_pyarrow_table()
    table = table.select(CAPTION_SCHEMA.names).cast(CAPTION_SCHEMA)
    return table if columns is None else table.select(list(columns))


def compact_table(output: str, target_bytes: Optional[int] = None,
                  retention_hours: float = DEFAULT_RETENTION_HOURS, commit_staged: bool = True) -> dict[str, int]:
    """``beam-captions compact`` on a Delta output: commit what a dead job left staged (``commit_staged``),
    then delta-rs's optimize (small files into files of about ``target_bytes``), vacuum (files no version
    of the last ``retention_hours`` uses) and the clean-up of expired log entries. Returns counters."""
    from deltalake import DeltaTable

    counts: dict[str, int] = dict(commit_leftovers(output)) if commit_staged else {}
    table = ensure_table(output)
    counts["files_before"] = len(table.file_uris())
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            optimized = table.optimize.compact(target_size=target_bytes, writer_properties=_writer_properties())
            break
        except Exception as error:  # noqa: BLE001 - a writer committed meanwhile: optimize the new version
            if not _is_conflict(error) or attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(_backoff(attempt))
            table = DeltaTable(table_uri(output), storage_options=storage_options(output))
    counts["files_merged"] = int(optimized.get("numFilesRemoved", 0))
    counts["files_written"] = int(optimized.get("numFilesAdded", 0))
    table = DeltaTable(table_uri(output), storage_options=storage_options(output))
    hours = max(0, math.ceil(retention_hours))
    removed = table.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False)
    counts["files_vacuumed"] = len(removed)
    table.create_checkpoint()
    table.cleanup_metadata()
    table = DeltaTable(table_uri(output), storage_options=storage_options(output))
    counts["files_after"] = len(table.file_uris())
    clip_ids = table.to_pyarrow_table(columns=["clip_id"]).column("clip_id")
    counts["rows"] = len(clip_ids)
    counts["clips_in_table"] = len(set(clip_ids.to_pylist()))
    counts["table_version"] = table.version()
    return counts
