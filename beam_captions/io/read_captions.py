"""``read_captions(OUT)``: the captions table with every window once, whatever state the output is in.

A plain ``pq.read_table("OUT/captions")`` reads every Parquet file there. Between a redo of a compacted
clip and the next ``compact`` that includes the clip's old rows in the merged file next to its new rows
in its own file, and a clip caught between its rows and its metas (a killed run) has rows no metas
records. This reader keeps the rows of a clip from the one file its metas names (``captions_file``),
reading only the metas it must: those of clips in their own files and of clips marked superseded in a
merged file (``io.superseded``). A compaction in flight (its journal there) counts the merged file for
the clips whose former file it already deleted.

On a Delta output (``--captions-table delta``: ``OUT/captions/_delta_log``) it is the Delta table's latest
version (``io.delta.read_table``), where every window is once by construction; rows still staged (a clip
finished after the last commit) appear with the next commit.
"""

from __future__ import annotations

import os
import posixpath
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.compaction import CaptionFile, is_compacted, list_caption_files, pending_journals, read_file
from beam_captions.io.files import parallel_map
from beam_captions.io.metas import read_meta
from beam_captions.io.paths import captions_dir
from beam_captions.io.superseded import merged_name, superseded_clips

__all__ = ["has_output", "read_captions"]


def _partition_columns(item: CaptionFile) -> dict[str, str]:
    """Hive-style ``key=value`` folders under ``captions/`` (``window=...`` of streaming outputs)."""
    columns = {}
    for folder in item.partition.split("/") if item.partition else []:
        key, sep, value = folder.partition("=")
        if sep:
            columns[key] = value
    return columns


def has_output(output: str) -> bool:
    """Whether ``output`` holds an output: a ``captions/``, ``metas/`` or ``failures/`` folder (on an object
    store: an object under one). A listing error is raised, never taken for "no output"."""
    from beam_captions.io.paths import failures_dir, is_local, local_path, metas_dir

    if not output or not str(output).strip():
        return False
    folders = (captions_dir(output), metas_dir(output), failures_dir(output))
    if is_local(output):
        return any(os.path.isdir(local_path(folder)) for folder in folders)
    return any(result.metadata_list for folder in folders
               for result in FileSystems.match([FileSystems.join(folder, "**")], limits=[1]))


def read_captions(output: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Every window of ``OUT/captions`` once, from the file its clip's metas names, with the partition
    columns a dataset read adds (``window`` on streaming outputs). ``columns``: the ones to return
    (``clip_id`` is read regardless, to pick the rows). A path with no output there (``""``, a folder
    without ``captions/``, ``metas/`` or ``failures/``) raises ``FileNotFoundError`` naming it."""
    from beam_captions.io.delta import has_delta_log, read_table

    if not has_output(output):  # never an empty table for a path that is not an output ("", a system folder)
        raise FileNotFoundError(f"read_captions: no beam-captions output at {output!r} (no captions/, metas/ or "
                                "failures/ folder there)")
    if has_delta_log(output):
        return read_table(output, columns)
    files = list_caption_files(output)
    marked = superseded_clips(output)
    in_flight: dict[str, set[str]] = {}  # merged file -> members a compaction in flight replaces
    for journal in pending_journals(output):
        if journal.get("merged"):
            in_flight[journal["merged"]] = set(journal["members"])
    present = {f.relpath for f in files}
    wanted = None if columns is None else sorted(set(columns) | {"clip_id"})

    def owner_says(clip_id: str, relpath: str, meta: Optional[dict]) -> bool:
        if meta is None:
            return is_compacted(relpath)  # rows of a merged file with no metas are kept, as compaction keeps them
        named = meta.get("captions_file")
        if named == relpath:
            return True
        return named in in_flight.get(relpath, ()) and named not in present  # its member is gone already

    def rows_of(item: CaptionFile) -> pa.Table:
        table = read_file(output, item.relpath, wanted)
        if is_compacted(item.relpath):
            check = marked.get(merged_name(item.relpath), set())
            if item.relpath in in_flight:
                check = set(table.column("clip_id").to_pylist())
        else:
            check = {posixpath.basename(item.relpath)[: -len(".parquet")]}
        ids = sorted(check & set(table.column("clip_id").to_pylist()))
        dropped = [c for c, meta in zip(ids, parallel_map(lambda c: read_meta(output, c), ids))
                   if not owner_says(c, item.relpath, meta)]
        if dropped:
            table = table.filter(pc.invert(pc.is_in(table.column("clip_id"), pa.array(dropped, pa.string()))))
        for key, value in _partition_columns(item).items():
            table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
        return table

    tables = parallel_map(rows_of, files, threads=8)
    if not tables:
        from beam_captions.io.parquet import CAPTION_SCHEMA

        empty = CAPTION_SCHEMA.empty_table()
        return empty if columns is None else empty.select(list(columns))
    table = pa.concat_tables(tables, promote_options="default")
    return table if columns is None else table.select(list(columns))
