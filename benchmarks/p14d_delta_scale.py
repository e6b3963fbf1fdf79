"""P14d: the Delta output at a million rows (issue 29, the Delta half of P14).

1. A Delta captions table of ``--rows`` rows (1,000,000: 333,334 clips of 3 windows, ~60-word captions) as the
   committer leaves it: one data file per commit of 200 clips (600 rows), each with its commit's
   ``write_seq``. It is built straight from Arrow (the data files written with pyarrow, added in one
   transaction with their statistics) because committing 1,667 batches one by one takes 10-20 minutes here.
2. The committer's index of it (``TableIndex.read``), which it reads at its first commit.
3. Commit throughput of one committer: ``--stage-clips`` clips (P9's synthetic clips, 1-4 windows) through the
   real writer (``write_clip``: staged rows and metas), then one committer pass (``Committer.commit_staged``:
   per clip its metas and staged file read, batches of 200, one Delta transaction each, the staged files
   deleted), timed: windows per second of wall time and of CPU time (the machine is shared: CPU time moves
   less with its load), against the ~900 windows/s a 100-GPU fleet makes (32,000 windows
   per GPU-hour). Beside it, the same pass on the same clips staged as Parquet files (the previous release's
   staging; a small Parquet file of this schema costs ~2.5 ms of CPU to read, an Arrow IPC stream ~0.06 ms).
4. A redo of 200 clips picked at random among the table's (written again through ``write_clip``, their
   metas absent as after a loss, so only the committer's index knows they are in the table), committed:
   the data files the commit removed (those that held the clips), their rows, and the rows the commit
   wrote (theirs less the clips' old rows, plus the new ones). Goal: at most 2 x the rows of the touched
   files. Beside it, the same redo with the predicate on ``clip_id`` alone (the previous release's
   replace): same files rewritten, but every data file scanned.
5. The same redo after ``beam-captions compact``'s optimize (small files into ``--target-mb`` files).
6. The layout not taken: 20 commits of 200 new clips each into a fresh table partitioned by a bucket of
   ``clip_id`` (its first two hex digits: 256 buckets), against the same commits into an unpartitioned one.

Run: ``.venv/bin/python benchmarks/p14d_delta_scale.py`` (about 5 minutes on 2 cores); it prints a table and
writes ``benchmarks/results/p14d_delta.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from p9_compact import WORDS  # noqa: E402

FLEET_WINDOWS_PER_S = 100 * 32000 / 3600  # 100 GPUs at the published 32,000 windows per GPU-hour
CLIPS_PER_FILE, WINDOWS = 200, 3


def _clip_id(number: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"/videos/clip-{number:07d}.mp4"))


def _file_rows(first: int, seq: int) -> pa.Table:
    """The rows of one commit: clips ``first`` .. ``first + 199``, three windows each, ``write_seq`` ``seq``."""
    from beam_captions.io.delta import TABLE_SCHEMA

    numbers = [n for n in range(first, first + CLIPS_PER_FILE) for _ in range(WINDOWS)]
    windows = [w for _ in range(CLIPS_PER_FILE) for w in range(WINDOWS)]
    caption = " ".join(WORDS[i % len(WORDS)] for i in range(60))
    columns = {
        "clip_id": [_clip_id(n) for n in numbers], "source": [f"/videos/clip-{n:07d}.mp4" for n in numbers],
        "window_index": windows, "start_frame": [w * 256 for w in windows], "end_frame": [w * 256 + 255 for w in windows],
        "start_s": [w * 8.5 for w in windows], "end_s": [w * 8.5 + 8.5 for w in windows],
        "num_sampled_frames": [18] * len(numbers), "caption": [f"{n}/{w}: {caption}" for n, w in zip(numbers, windows)],
        "caption_model": ["Qwen/Qwen2.5-VL-7B-Instruct"] * len(numbers), "caption_prompt_tokens": [3040] * len(numbers),
        "write_seq": [seq] * len(numbers),
    }
    return pa.table({name: columns.get(name, [None] * len(numbers)) for name in TABLE_SCHEMA.names}, schema=TABLE_SCHEMA)


def build_table(out: str, rows: int) -> dict:
    """``OUT/captions`` with ``rows`` rows in files of 600, added in one transaction with their statistics."""
    from deltalake import DeltaTable
    from deltalake.transaction import AddAction

    from beam_captions.io.delta import TABLE_SCHEMA, ensure_table, table_uri

    started = time.perf_counter()
    ensure_table(out)
    folder = table_uri(out)
    actions = []
    files = -(-rows // (CLIPS_PER_FILE * WINDOWS))
    for index in range(files):
        table = _file_rows(index * CLIPS_PER_FILE, 1_000_000 + index)
        name = f"part-{index:05d}-{uuid.uuid4()}-c000.zstd.parquet"
        pq.write_table(table, os.path.join(folder, name), compression="zstd")
        ids = table.column("clip_id").to_pylist()
        stats = {"numRecords": table.num_rows,
                 "minValues": {"clip_id": min(ids), "write_seq": 1_000_000 + index},
                 "maxValues": {"clip_id": max(ids), "write_seq": 1_000_000 + index},
                 "nullCount": {"clip_id": 0, "write_seq": 0}}
        actions.append(AddAction(name, os.path.getsize(os.path.join(folder, name)), {}, int(time.time() * 1000), True,
                                 json.dumps(stats)))
    DeltaTable(folder).create_write_transaction(actions, "append", TABLE_SCHEMA)
    return {"files": files, "rows": files * CLIPS_PER_FILE * WINDOWS, "build_s": round(time.perf_counter() - started, 1)}


def _synthetic_clip(out: str, number: int, windows: int, text: str) -> None:
    """Clip ``number`` through the real writer in Delta mode (staged rows, metas), as a job writes it."""
    from beam_captions.io.clip_output import write_clip
    from beam_captions.records import ClipInfo, WindowRecord

    source, clip_id = f"/videos/clip-{number:07d}.mp4", _clip_id(number)
    version = (5000 + number, 2.0)
    caption = " ".join(WORDS[(number + i) % len(WORDS)] for i in range(60))
    elements = [WindowRecord(clip_id, source, i, i * 256, i * 256 + 255, i * 8.5, i * 8.5 + 8.5,
                             tuple(range(i * 256, i * 256 + 256, 32)), caption=f"{text} {i}: {caption}",
                             caption_model="Qwen/Qwen2.5-VL-7B-Instruct", caption_prompt_tokens=3040,
                             source_version=version) for i in range(windows)]
    elements.append(ClipInfo(clip_id, source, 1920, 1080, 30.0, windows * 256, "h264", windows * 8.5, windows,
                             source_version=version))
    write_clip(out, clip_id, elements, asked={"captions": {"model": "m"}}, captions_table="delta")


def _stage_as_parquet(out: str, clip_ids: list[str]) -> None:
    """The clips' staged files rewritten as Parquet files (as the previous release staged them)."""
    from beam_captions.io.delta import read_staged

    for clip_id in clip_ids:
        path = os.path.join(out, "metas", f"{clip_id}.json")
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
        staged = meta["captions_staged"]
        meta["captions_staged"] = staged[: -len(".arrow")] + ".parquet"
        pq.write_table(read_staged(out, staged), os.path.join(out, meta["captions_staged"]), compression="zstd")
        os.remove(os.path.join(out, staged))
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(meta, handle)


def _last_commit(out: str, before: dict[str, int]) -> dict:
    """The files the latest commit removed (with their rows, from ``before``: path -> rows) and the rows it wrote."""
    from deltalake import DeltaTable

    from beam_captions.io.delta import table_uri

    table = DeltaTable(table_uri(out))
    log = os.path.join(table_uri(out), "_delta_log", f"{table.version():020d}.json")
    removed, written = [], 0
    with open(log, encoding="utf-8") as handle:
        for line in handle:
            action = json.loads(line)
            if "remove" in action:
                removed.append(action["remove"]["path"])
            if "add" in action:
                written += json.loads(action["add"]["stats"])["numRecords"]
    return {"files_removed": len(removed), "rows_of_removed_files": sum(before[p] for p in removed),
            "rows_written": written, "table_files": len(before), "table_rows": sum(before.values())}


def _file_rows_now(out: str) -> dict[str, int]:
    from deltalake import DeltaTable

    from beam_captions.io.delta import table_uri

    actions = DeltaTable(table_uri(out)).get_add_actions(flatten=True)
    actions = pa.table(actions)
    return dict(zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist()))


def redo(out: str, picked: list[int], clip_id_only: bool = False) -> dict:
    """Clips ``picked`` written again (2 windows each) and committed by a committer of its own."""
    import beam_captions.io.delta_committer as delta_committer

    for number in picked:  # the table was built without metas: as after their loss, only the index finds them
        _synthetic_clip(out, number, 2, "redo")
    before = _file_rows_now(out)
    committer = delta_committer.Committer(out)
    started = time.perf_counter()
    committer.open(read_index=True)
    opened = time.perf_counter()
    original = delta_committer._replace_predicate
    if clip_id_only:
        delta_committer._replace_predicate = lambda ids, held, seq: f"clip_id IN ({delta_committer._in_list(ids)})"
    try:
        counts = committer.commit_staged()
    finally:
        delta_committer._replace_predicate = original
    done = time.perf_counter()
    result = _last_commit(out, before)
    new_rows = 2 * len(picked)
    result.update(index_read_s=round(opened - started, 2), commit_s=round(done - opened, 2),
                  replaced=bool(counts.get("delta_commits_replacing")), new_rows=new_rows,
                  rows_copied=result["rows_written"] - new_rows,
                  ratio=round(result["rows_written"] / max(1, result["rows_of_removed_files"]), 3))
    return result


def bucket_commits(root: str, commits: int = 20) -> dict:
    """Median seconds a commit of 200 new clips, and data files a commit, unpartitioned and in 256 buckets."""
    import statistics

    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake

    found = {}
    for label, buckets in (("unpartitioned", False), ("256_buckets", True)):
        path, seconds = os.path.join(root, label), []
        for commit in range(commits):
            table = _file_rows(10_000_000 + commit * CLIPS_PER_FILE, commit)
            if buckets:
                table = table.append_column("bucket", pc.utf8_slice_codeunits(table.column("clip_id"), 0, 2))
            started = time.perf_counter()
            write_deltalake(path, table, mode="append", partition_by=["bucket"] if buckets else None)
            seconds.append(time.perf_counter() - started)
        found[label] = {"median_commit_s": round(statistics.median(seconds), 3),
                        "files_per_commit": round(len(DeltaTable(path).file_uris()) / commits, 1)}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stage-clips", type=int, default=2000)
    parser.add_argument("--redo-clips", type=int, default=200)
    parser.add_argument("--target-mb", type=float, default=256.0)
    args = parser.parse_args(argv)
    from beam_captions.io.delta import compact_table
    from beam_captions.io.delta_committer import Committer

    root = tempfile.mkdtemp(prefix="p14d-")
    results: dict = {"rows": args.rows}
    try:
        out = os.path.join(root, "out")
        results["table"] = build_table(out, args.rows)
        clips_in_table = results["table"]["rows"] // WINDOWS
        shutil.copytree(out, os.path.join(root, "pristine"))

        first = clips_in_table  # new clips, after those of the table
        for number in range(first, first + args.stage_clips):
            _synthetic_clip(out, number, 1 + number % 4, "new")
        windows = sum(1 + number % 4 for number in range(first, first + args.stage_clips))
        shutil.copytree(out, os.path.join(root, "staged"))
        for key, as_parquet in (("throughput", False), ("throughput_parquet_staged", True)):
            shutil.rmtree(out)
            shutil.copytree(os.path.join(root, "staged"), out)
            if as_parquet:
                _stage_as_parquet(out, [_clip_id(n) for n in range(first, first + args.stage_clips)])
            committer = Committer(out)
            started = time.perf_counter()
            committer.open(read_index=True)
            opened, cpu = time.perf_counter(), time.process_time()
            counts = committer.commit_staged()
            done, cpu = time.perf_counter(), time.process_time() - cpu
            results[key] = {
                "clips": args.stage_clips, "windows": windows, "commits": counts.get("delta_commits"),
                "index_read_s": round(opened - started, 2), "commit_pass_s": round(done - opened, 2),
                "windows_per_s": round(windows / (done - opened)), "clips_per_s": round(args.stage_clips / (done - opened)),
                "fleet_windows_per_s": round(FLEET_WINDOWS_PER_S),
                "x_fleet": round(windows / (done - opened) / FLEET_WINDOWS_PER_S, 2),
                "cpu_s": round(cpu, 2), "windows_per_cpu_s": round(windows / cpu),
            }

        picked = random.Random(29).sample(range(clips_in_table), args.redo_clips)
        for label, clip_id_only in (("redo", False), ("redo_clip_id_only", True)):
            shutil.rmtree(out)
            shutil.copytree(os.path.join(root, "pristine"), out)
            results[label] = redo(out, picked, clip_id_only)
        shutil.rmtree(out)
        shutil.copytree(os.path.join(root, "pristine"), out)
        started = time.perf_counter()
        compacted = compact_table(out, int(args.target_mb * 1024 * 1024), retention_hours=0)
        results["compact"] = {"s": round(time.perf_counter() - started, 1), "files_after": compacted["files_after"],
                              "target_mb": args.target_mb}
        results["redo_after_compact"] = redo(out, picked)
        results["buckets"] = bucket_commits(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    t, r, c, rc = results["throughput"], results["redo"], results["redo_clip_id_only"], results["redo_after_compact"]
    tp = results["throughput_parquet_staged"]
    print(f"P14d, a Delta table of {results['table']['rows']:,} rows in {results['table']['files']:,} files "
          f"(built in {results['table']['build_s']} s)")
    print("| what | value |\n|---|---|")
    print(f"| the committer's index, read at its first commit | {t['index_read_s']} s |")
    print(f"| commit throughput, one committer ({t['clips']} clips, {t['windows']} windows, {t['commits']} commits) | "
          f"{t['windows_per_s']} windows/s = {t['x_fleet']} x a 100-GPU fleet ({t['fleet_windows_per_s']}/s); "
          f"{t['windows_per_cpu_s']} windows per CPU second |")
    print(f"| same, the clips staged as Parquet files (the previous release) | {tp['windows_per_s']} windows/s = "
          f"{tp['x_fleet']} x the fleet; {tp['windows_per_cpu_s']} windows per CPU second |")
    for name, row in ((f"redo of {args.redo_clips} clips", r), ("same, predicate on clip_id only", c),
                      (f"redo after compact (--target-size-mb {args.target_mb:g}: "
                       f"{results['compact']['files_after']} files)", rc)):
        print(f"| {name} | {row['files_removed']} of {row['table_files']} files touched, "
              f"{row['rows_of_removed_files']:,} rows in them; {row['rows_written']:,} rows written "
              f"({row['rows_copied']:,} copied, {row['new_rows']} new) = {row['ratio']} x the touched files; "
              f"commit {row['commit_s']} s |")
    b = results["buckets"]
    print(f"| a commit of 200 new clips: unpartitioned / 256 buckets of clip_id | "
          f"{b['unpartitioned']['median_commit_s']} s / {b['256_buckets']['median_commit_s']} s, "
          f"{b['unpartitioned']['files_per_commit']} / {b['256_buckets']['files_per_commit']} files |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "p14d_delta.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
