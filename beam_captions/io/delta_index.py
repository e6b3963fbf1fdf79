"""Which clips have rows in a Delta captions table, and the ``write_seq`` of those rows (``TableIndex``).

The committer (``io.delta_committer``) reads the table's ``clip_id`` and ``write_seq`` columns once, then keeps
the index up to date with its own commits. With it, a commit knows without a scan which clips of a batch
are in the table already (whatever their metas say: lost, unreadable, or written by two racing first
writes) and the ``write_seq`` of their rows, which names the data files that hold them (each commit writes
its rows with one ``write_seq``): a replace reads and rewrites those files only.

Memory: 16 bytes a (clip, write_seq) pair (a 64-bit digest of the clip id and the sequence), so 10 million
clips take 160 MB. Two clip ids with the same digest (for ten million clips, a chance of about 3 in a million)
make a clip look present: its commit is then a replace that finds none of its rows, which costs a read and
changes nothing.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["LEGACY_SEQ", "TableIndex", "clip_key"]

LEGACY_SEQ = -1  # rows committed before ``write_seq`` existed (null there): found by clip id alone
_FOLD_AT = 100_000  # clips committed since the last fold: then they go into the sorted arrays


def clip_key(clip_id: str) -> int:
    """A 64-bit digest of a clip id."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode("utf-8"), digest_size=8).digest(), "little")


class TableIndex:
    """The (clip, write_seq) pairs of a table: read once (``read``), then kept by ``record``."""

    def __init__(self, keys: np.ndarray, seqs: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self._keys, self._seqs = keys[order], seqs[order]
        self._changed: dict[str, frozenset[int]] = {}  # clips committed since: what they hold now

    @classmethod
    def read(cls, table) -> "TableIndex":
        """The index of a ``deltalake.DeltaTable`` at its loaded version: its distinct (clip_id, write_seq)
        pairs, read by delta-rs's query engine (about a second for a million rows on 2 cores)."""
        from deltalake import QueryBuilder

        query = f"SELECT DISTINCT clip_id, COALESCE(write_seq, {LEGACY_SEQ}) AS seq FROM captions"
        pairs = pa.table(QueryBuilder().register("captions", table).execute(query).read_all())
        keys = np.fromiter((clip_key(c) for c in pairs.column("clip_id").to_pylist()), dtype=np.uint64,
                           count=pairs.num_rows)
        return cls(keys, pairs.column("seq").to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self._keys)

    def seqs_of(self, clip_id: str) -> frozenset[int]:
        """The ``write_seq`` values of the clip's rows in the table (empty: it has none there)."""
        if clip_id in self._changed:
            return self._changed[clip_id]
        key = np.uint64(clip_key(clip_id))
        start, end = np.searchsorted(self._keys, key, "left"), np.searchsorted(self._keys, key, "right")
        return frozenset(int(seq) for seq in self._seqs[start:end])

    def record(self, clip_ids: Sequence[str], seq: int, with_rows: Iterable[str]) -> None:
        """A commit replaced every row of ``clip_ids``: those ``with_rows`` now have rows of ``seq``, the
        others none."""
        having = set(with_rows)
        for clip_id in clip_ids:
            self._changed[clip_id] = frozenset({seq}) if clip_id in having else frozenset()
        if len(self._changed) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Move the clips committed since into the sorted arrays (a run of a million clips stays 16 MB)."""
        changed = np.fromiter((clip_key(c) for c in self._changed), dtype=np.uint64, count=len(self._changed))
        kept = ~np.isin(self._keys, changed)
        pairs = [(clip_key(c), seq) for c, seqs in self._changed.items() for seq in seqs]
        keys = np.concatenate([self._keys[kept], np.array([k for k, _ in pairs], dtype=np.uint64)])
        seqs = np.concatenate([self._seqs[kept], np.array([s for _, s in pairs], dtype=np.int64)])
        order = np.argsort(keys, kind="stable")
        self._keys, self._seqs, self._changed = keys[order], seqs[order], {}
