"""The committer of a Delta captions table (``--captions-table delta``): staged clips into the table.

A ``Committer`` commits batches of finished clips, each in ONE Delta transaction: per clip, the staged file
its metas names now (its newest write), read, with every row of the batch given the commit's ``write_seq``
(the committer's clock in microseconds, increasing). Which clips of the batch are in the table already, and
under which ``write_seq``, says the committer's ``TableIndex`` (read from the table once, then kept with each
commit), not the metas: a clip whose metas was lost or could not be read, or that two first writes wrote,
is found all the same.

- A batch of clips none of which is in the table is appended: no file of the table is read.
- A batch with clips in the table replaces every row of its clips: delta-rs's overwrite with the predicate
  ``clip_id IN (batch) AND write_seq IN (their write_seqs, this one)``. The ``write_seq`` clause lets delta-rs
  skip, by the files' statistics, every data file that holds none of those rows (a commit's file holds one
  ``write_seq``), so it reads and rewrites only the files that hold the replaced clips.
- Idempotent: the commit carries a Delta transaction identifier (app id: this committer, version: the
  ``write_seq``). An attempt that raised after its commit landed is found by it (``transaction_version``) and
  not made again; a commit that landed before its staged files were deleted (a killed committer) is, for
  the next committer, a batch of clips in the table: it replaces them with the same rows.
- A commit that loses a race to another writer (delta-rs ``CommitFailedError``) is tried again on the new
  version of the table; a version that another writer made (not an optimize or vacuum, which keep every
  row's ``write_seq``) makes the committer read its index again.

One committer per output at a time (the job's: the launcher's ``CommitLoop`` or the pipeline's
``CommitToDelta``): two committers that commit one clip at the same moment could both append it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Optional

import pyarrow as pa

from beam_captions.io.delta import (
    COMMIT_ATTEMPTS, DELTA, WRITE_SEQ, backoff, delete_staged, ensure_table, is_conflict, read_staged, staged_files,
    writer_properties,
)
from beam_captions.io.delta_index import LEGACY_SEQ, TableIndex
from beam_captions.io.files import parallel_map
from beam_captions.io.metas import read_meta

__all__ = [
    "BATCH_CLIPS", "COMMIT_EVERY_S", "CommitLoop", "Committer", "STALE_STAGED_S", "commit_clips", "commit_leftovers",
]

BATCH_CLIPS = 200  # clips per commit
STALE_STAGED_S = 6 * 3600.0  # a staged file no metas names, this old, is a dead write
COMMIT_EVERY_S = 5.0  # the launcher's committer: a pass over the staging area this often
IO_THREADS = 64  # a pass reads 2 files a clip: on gs:// (~30 ms a request) 64 in flight keep up with 300 clips/s
COMMITTER = "beam-captions.committer"  # commitInfo key: the app id of the committer that made the commit
_KEEP_EVERY_ROW = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END", "CREATE TABLE", "ADD COLUMN"})
_LOG = logging.getLogger("beam_captions")


def _in_list(values: Iterable[str]) -> str:
    return ", ".join("'" + value.replace("'", "''") + "'" for value in values)


def _replace_predicate(clip_ids: list[str], held: set[int], seq: int) -> str:
    """Every row of ``clip_ids`` whose ``write_seq`` is one of ``held`` (or ``seq``: the new rows match too)."""
    seqs = ", ".join(str(s) for s in sorted({s for s in held if s != LEGACY_SEQ} | {seq}))
    by_seq = f"{WRITE_SEQ} IN ({seqs})" + (f" OR {WRITE_SEQ} IS NULL" if LEGACY_SEQ in held else "")
    return f"clip_id IN ({_in_list(clip_ids)}) AND ({by_seq})"


def named_staged(output: str, clip_id: str) -> Optional[str]:
    """The staged file the clip's metas names (its newest write), or ``None``."""
    meta = read_meta(output, clip_id)
    if isinstance(meta, dict) and meta.get("captions_table") == DELTA and meta.get("captions_staged"):
        return str(meta["captions_staged"])
    return None


def _add(totals: dict[str, int], counts: dict[str, int]) -> None:
    for name, value in counts.items():
        totals[name] = totals.get(name, 0) + value


class Committer:
    """Commits staged clips of ``output`` to its Delta table (see the module's docstring)."""

    def __init__(self, output: str, batch_clips: int = BATCH_CLIPS):
        self.output = output
        self.batch_clips = batch_clips
        self.app_id = f"beam-captions-{uuid.uuid4().hex}"
        self._table: Any = None
        self._index: Optional[TableIndex] = None
        self._version = -1  # the table version the index describes, but for ``_own``
        self._own: set[int] = set()  # the versions of this committer's commits (the index has them)
        self._last_seq = 0

    # ------------------------------------------------------------------------------- table and index

    def _refresh(self) -> Any:
        """The table at its latest version (made if there is none), with the index brought up to it."""
        if self._table is None:
            self._table = ensure_table(self.output)
        else:
            self._table.update_incremental()
        version = self._table.version()
        if self._index is None or self._rows_changed_since(self._version, version):
            self._index = TableIndex.read(self._table)
        self._version = version
        return self._table

    def _rows_changed_since(self, known: int, version: int) -> bool:
        """Whether a version after ``known`` (up to ``version``) may have added or removed rows that the index
        does not have: any commit but this committer's and an optimize or vacuum (which keep every row and
        its ``write_seq``)."""
        if version <= known:
            return False
        return any(entry.get("version", known + 1) > known and entry.get("version") not in self._own
                   and entry.get("operation") not in _KEEP_EVERY_ROW
                   for entry in self._table.history(limit=version - known))

    def open(self, read_index: bool = False) -> None:
        """Make the table if there is none yet (readers find one from the start); ``read_index``: read its
        index now, not at the first commit (a run that commits nothing never reads the table's files)."""
        if read_index:
            self._refresh()
        elif self._table is None:
            self._table = ensure_table(self.output)

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        return self._last_seq

    # ------------------------------------------------------------------------------------------ commits

    def commit(self, clip_ids: Iterable[str], before_commit: Optional[Callable[[int], None]] = None) -> dict[str, int]:
        """Commit the staged rows of ``clip_ids`` (the file each one's metas names now) in batches of
        ``batch_clips``, one transaction each, then delete those staged files. Returns counters."""
        ids = sorted(set(clip_ids))
        named = {c: r for c, r in zip(ids, parallel_map(lambda c: named_staged(self.output, c), ids, IO_THREADS)) if r}
        return self._commit_named(named, before_commit)

    def commit_staged(self, stale_s: float = STALE_STAGED_S, now: Optional[float] = None) -> dict[str, int]:
        """A pass over the staging area: commit every staged file a clip's metas names (left by a job that
        was killed, or staged since the last pass). A staged file no metas names is an unfinished write (its
        metas not written yet) or one a newer write superseded: deleted once ``stale_s`` old."""
        now = time.time() if now is None else now
        found = staged_files(self.output)
        if not found:
            return {}
        clip_ids = sorted({clip_id for _, clip_id, _ in found})
        present = {relpath for relpath, _, _ in found}
        named = {c: r for c, r in zip(clip_ids, parallel_map(lambda c: named_staged(self.output, c), clip_ids,
                                                                 IO_THREADS)) if r in present}
        totals = self._commit_named(named)
        dead = [relpath for relpath, _, modified in found
                if relpath not in named.values() and now - modified >= stale_s]
        delete_staged(self.output, dead)
        if dead:
            totals["delta_staged_removed"] = len(dead)
        return totals

    def uncommitted(self) -> int:
        """How many clips are staged and not committed (a staged file their metas names is there)."""
        found = staged_files(self.output)
        clip_ids = sorted({clip_id for _, clip_id, _ in found})
        present = {relpath for relpath, _, _ in found}
        return sum(r in present for r in parallel_map(lambda c: named_staged(self.output, c), clip_ids, IO_THREADS))

    def _commit_named(self, named: dict[str, str], before_commit: Optional[Callable[[int], None]] = None
                      ) -> dict[str, int]:
        totals: dict[str, int] = {}
        ids = sorted(named)
        for start in range(0, len(ids), self.batch_clips):
            _add(totals, self._commit_batch({c: named[c] for c in ids[start:start + self.batch_clips]}, before_commit))
        return totals

    def _commit_batch(self, named: dict[str, str], before_commit: Optional[Callable[[int], None]]) -> dict[str, int]:
        ids = sorted(named)
        tables = dict(zip(ids, parallel_map(lambda c: read_staged(self.output, named[c]), ids, IO_THREADS)))
        present = [c for c in ids if tables[c] is not None]
        gone = {"delta_clips_already_committed": len(ids) - len(present)} if len(present) < len(ids) else {}
        if not present:  # committed, and their staged files deleted, by an earlier commit
            return gone
        seq = self._next_seq()
        data = pa.concat_tables([tables[c] for c in present])
        data = data.append_column(WRITE_SEQ, pa.array([seq] * data.num_rows, pa.int64()))
        attempts, replaced = self._write(data, present, seq, before_commit)
        self._index.record(present, seq, with_rows=set(data.column("clip_id").to_pylist()))
        delete_staged(self.output, [named[c] for c in present])
        return {"delta_commits": int(attempts > 0), "delta_clips_committed": len(present),
                "delta_rows_committed": data.num_rows, "delta_commit_retries": max(0, attempts - 1),
                "delta_commits_replacing": int(replaced), **gone}

    def _write(self, data: pa.Table, clip_ids: list[str], seq: int,
               before_commit: Optional[Callable[[int], None]]) -> tuple[int, bool]:
        """One transaction: append ``data``, or replace the rows of ``clip_ids`` the table holds by it.
        Returns (attempts made, 0 when nothing had to be written; whether it replaced)."""
        from deltalake import CommitProperties, write_deltalake
        from deltalake.transaction import Transaction

        for attempt in range(COMMIT_ATTEMPTS):
            table = self._refresh()
            if (table.transaction_version(self.app_id) or 0) >= seq:  # an attempt that raised had landed
                return attempt, False
            held = set().union(*(self._index.seqs_of(c) for c in clip_ids))
            if not held and data.num_rows == 0:
                return 0, False
            if before_commit is not None:
                before_commit(attempt)
            properties = CommitProperties(
                custom_metadata={COMMITTER: self.app_id, "beam-captions.clips": str(len(clip_ids))},
                app_transactions=[Transaction(self.app_id, seq)])
            try:
                if held:
                    write_deltalake(table, data, mode="overwrite", predicate=_replace_predicate(clip_ids, held, seq),
                                    commit_properties=properties, writer_properties=writer_properties())
                else:
                    write_deltalake(table, data, mode="append", commit_properties=properties,
                                    writer_properties=writer_properties())
            except Exception as error:  # noqa: BLE001
                if not is_conflict(error) or attempt == COMMIT_ATTEMPTS - 1:
                    raise
                _LOG.info("Delta commit of %d clips lost a race (%s); trying again", len(clip_ids),
                          str(error).splitlines()[0])
                time.sleep(backoff(attempt))
                continue
            self._own.add(self._table.version())  # the version of this commit, which the index records next
            return attempt + 1, bool(held)
        raise AssertionError("unreachable")


def commit_clips(output: str, clip_ids: Iterable[str], *,
                 before_commit: Optional[Callable[[int], None]] = None) -> dict[str, int]:
    """``Committer(output).commit(clip_ids)``: a committer of its own (it reads the table's index)."""
    return Committer(output).commit(clip_ids, before_commit)


def commit_leftovers(output: str, batch_clips: int = BATCH_CLIPS, stale_s: float = STALE_STAGED_S,
                     now: Optional[float] = None) -> dict[str, int]:
    """What a job left staged, committed by a committer of its own (``Committer.commit_staged``). Run it
    while no other committer commits to ``output`` (the launcher does, holding the output's lease)."""
    return Committer(output, batch_clips).commit_staged(stale_s, now)


class CommitLoop:
    """The committer of a job the launcher waits for: its first pass commits what an earlier job left staged
    (``start``), then a thread commits what the job stages, a pass every ``every_s``, so the table grows
    while the job runs; ``finish`` (the job ended) makes the last pass. A failed pass is logged and the next
    one tries again. ``counts`` is what the summary shows: what this run committed and, for a run that did
    not finish (stopped, broke), how many clips it leaves staged for the next run."""

    def __init__(self, output: str, every_s: Optional[float] = None, batch_clips: int = BATCH_CLIPS):
        self.committer = Committer(output, batch_clips)
        self.every_s = COMMIT_EVERY_S if every_s is None else every_s
        self.totals: dict[str, int] = {}
        self.finished = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> dict[str, int]:
        """The first pass (raises if it fails: nothing has run yet), then the thread. Returns the first
        pass's counters, which ``totals`` leaves out (they are an earlier job's clips)."""
        self.committer.open()
        first = self.committer.commit_staged()
        self._thread = threading.Thread(target=self._run, name="delta-committer", daemon=True)
        self._thread.start()
        return first

    def _pass(self) -> None:
        with self._lock:
            _add(self.totals, self.committer.commit_staged())

    def _run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                self._pass()
            except Exception:  # noqa: BLE001 - the next pass (or the last) tries again
                _LOG.warning("a Delta commit failed; the next pass tries again", exc_info=True)

    def close(self, wait_s: Optional[float] = 10.0) -> None:
        """No more passes: the thread ends (waited for up to ``wait_s``, through a commit under way)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(wait_s)

    def finish(self) -> None:
        """The job ended: the last pass, after the thread's (raises if it fails)."""
        self.close(None)
        self._pass()
        self.finished = True

    def counts(self) -> dict[str, int]:
        """This run's commit counters; unless ``finish`` ran, the passes end and ``delta_clips_staged`` says
        how many clips are staged and not committed (their metas names a staged file that is there)."""
        if self.finished:
            return dict(self.totals)
        self.close()
        held = self._lock.acquire(timeout=10.0)  # a commit under way ends first (it may take these clips)
        try:
            return {**self.totals, "delta_clips_staged": self.committer.uncommitted()}
        finally:
            if held:
                self._lock.release()
