"""``beam-captions compact OUT``: merge an output's small caption files (plain Parquet, a Beam job) or
optimize its Delta table."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from beam_captions.cli.errors import one_line_error, refuse, submitted_only
from beam_captions.cli.stops import StopCompaction


def compact(argv: Sequence[str]) -> dict[str, int]:
    """``beam-captions compact OUT``: merge the output's small caption files (a Beam job; other
    arguments go to Beam, e.g. a runner); prints files before and after, rows and clips. Returns the counters.

    Ctrl-C / SIGTERM stop it cleanly (``StopCompaction``): one line, exit 130 / 143; a second run completes it.
    Bad arguments are one line and exit 2, before any work."""
    from beam_captions.cli.refusals import refuse_missing_output, refuse_unwritable_output

    args, beam_args, target_bytes = compact_arguments(argv)
    refuse_missing_output("compact", args.output)
    refuse_unwritable_output(args.output, "compact", create=False)
    if _is_delta_output(args.output):
        return _compact_delta(args, target_bytes)
    with StopCompaction(args.output) as stop:
        return _run_compaction(args, beam_args, target_bytes, stop)


def compact_arguments(argv: Sequence[str]):
    """``compact``'s own arguments, the rest (for Beam) and the target size in bytes (``None``: the default);
    a bad one is one line and exit 2."""
    import argparse

    from beam_captions.limits import MAX_LOCAL_WORKERS, MAX_SECONDS

    parser = argparse.ArgumentParser(
        prog="beam-captions compact",
        description="Merge an output's small caption Parquet files into large ones (row groups by clip) and write "
        "OUT/captions/_manifest.json. Every row is kept once; clips' metas point at their new file. It may run "
        "while jobs write to OUT (their writes are kept; on a streaming output only partitions closed past the "
        "job's --lateness-horizon-seconds are merged); running it again changes nothing. Ctrl-C stops it once the merged files being "
        "committed are in place; running it again completes the rest. Other arguments go to Beam (e.g. --runner).",
    )
    parser.error = _compact_usage_error  # one line, exit 2
    parser.add_argument("output", help="the output root of a run (local or gs://)")
    parser.add_argument("--target-size-mb", metavar="MB", default=None,
                        help="about how large each merged file is (default 256)")
    parser.add_argument("--local-workers", type=int, default=None,
                        help=f"DirectRunner threads (default: every core; at most {MAX_LOCAL_WORKERS})")
    parser.add_argument("--retention-hours", type=float, default=None, metavar="H",
                        help="Delta outputs (--captions-table delta): vacuum deletes the files no table version of "
                             "the last H hours uses (default 168); a reader of an older version then fails")
    args, beam_args = parser.parse_known_args(argv)
    target_bytes = None if args.target_size_mb is None else _target_bytes(args.target_size_mb)
    if args.target_size_mb is not None and target_bytes is None:
        _compact_usage_error(f"--target-size-mb must be a finite number of megabytes, at least one byte (such as 256), "
                            f"not {args.target_size_mb!r}")
    if args.local_workers is not None and not 1 <= args.local_workers <= MAX_LOCAL_WORKERS:
        _compact_usage_error(f"--local-workers must be between 1 and {MAX_LOCAL_WORKERS}, got {args.local_workers}")
    if args.retention_hours is not None and not (args.retention_hours >= 0 and args.retention_hours < float("inf")):
        _compact_usage_error(f"--retention-hours must be a finite number of hours, 0 or more, not {args.retention_hours}")
    if args.retention_hours is not None and args.retention_hours > MAX_SECONDS / 3600:  # deltalake panics past it
        _compact_usage_error(f"--retention-hours must be at most {MAX_SECONDS // 3600} (about 3 years), "
                             f"got {args.retention_hours:g}")
    return args, beam_args, target_bytes


def _is_delta_output(output: str) -> bool:
    from beam_captions.io.delta import DELTA, output_format
    from beam_captions.io.paths import absolute_location

    return output_format(absolute_location(output)) == DELTA


def _compact_delta(args, target_bytes: Optional[int]) -> dict[str, int]:
    """``beam-captions compact`` on a Delta output (``--captions-table delta``): commit the rows a dead run
    left staged, then delta-rs's optimize, vacuum and log clean-up (``io.delta.compact_table``), in this
    process (Beam arguments are not used). Safe beside a running job: every step is a Delta commit that
    a concurrent commit makes retry; the staged rows of a live run are left to its own committer."""
    from beam_captions.io.compaction import DEFAULT_TARGET_BYTES
    from beam_captions.io.delta import DEFAULT_RETENTION_HOURS, compact_table, table_uri
    from beam_captions.io.files import read_json_or_none
    from beam_captions.io.lease import describe_holder, holder_is_live, lease_path
    from beam_captions.io.paths import absolute_location
    from beam_captions.summary import first_line, plural

    output = absolute_location(args.output)
    hours = DEFAULT_RETENTION_HOURS if args.retention_hours is None else args.retention_hours
    holder = read_json_or_none(lease_path(output))
    live = holder_is_live(holder)
    if live and hours < 1:
        refuse(f"compact {args.output}: a run is writing to it ({describe_holder(holder)}); --retention-hours "
                f"{hours:g} could delete files its commits are writing: give 1 or more, or wait for it to end")
    if live:
        print(f"beam-captions compact: a run is writing to {args.output} ({describe_holder(holder)}); its staged "
              "rows are left to its committer", flush=True)
    started = time.monotonic()
    try:
        counts = compact_table(output, target_bytes or DEFAULT_TARGET_BYTES, hours, commit_staged=not live)
    except KeyboardInterrupt:
        print(f"\nbeam-captions compact: stopped; each Delta commit is whole or absent; running `beam-captions "
              f"compact {shlex.quote(args.output)}` again completes the rest", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    print(f"{first_line('beam-captions compact', time.monotonic() - started)} (Delta table)\n"
          f"  staged           {plural(counts.get('delta_clips_committed', 0), 'clip')} committed (left by a run "
          f"that stopped before its commit)\n"
          f"  files            {counts['files_before']} before, {counts['files_after']} after "
          f"({counts['files_merged']} merged into {counts['files_written']}; {counts['files_vacuumed']} vacuumed, "
          f"retention {hours:g} h)\n"
          f"  rows             {counts['rows']} of {plural(counts['clips_in_table'], 'clip')}\n"
          f"  table            {table_uri(output)} (version {counts['table_version']})", flush=True)
    return counts


def _run_compaction(args, beam_args: list[str], target_bytes: Optional[int], stop: "StopCompaction") -> dict[str, int]:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_captions.io.compaction import DEFAULT_TARGET_BYTES, MANIFEST, reset_progress, unreadable_files
    from beam_captions.local import local_beam_args, local_runner, runs_in_this_process
    from beam_captions.metrics import counters
    from beam_captions.summary import first_line, plural
    from beam_captions.transforms.compact import CompactCaptions
    from beam_captions.io.paths import is_local, local_path

    target_bytes = target_bytes or DEFAULT_TARGET_BYTES
    output = args.output
    if is_local(output):
        output = os.path.abspath(local_path(output))
        if not os.path.isdir(os.path.join(output, "captions")):
            refuse(f"compact {args.output}: no captions folder there (is it the output root of a run?)")
    from beam_captions.io.files import read_json_or_none
    from beam_captions.io.lease import describe_holder, holder_is_live, lease_path
    from beam_captions.io.partitions import read_settings

    holder = read_json_or_none(lease_path(output))
    if holder_is_live(holder):  # safe: its writes during the compaction are kept (io.compaction)
        print(f"beam-captions compact: a run is writing to {args.output} ({describe_holder(holder)}); what it writes "
              "meanwhile is kept" + ("; partitions it may still write are left alone" if read_settings(output) else ""),
              flush=True)
    started = time.monotonic()
    beam_args = local_beam_args(beam_args, args.local_workers, False)
    options = PipelineOptions(beam_args)
    stop.in_process = runs_in_this_process(beam_args)
    reset_progress()
    if stop.signum is not None:  # stopped while starting up
        stop.stop()
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    pipeline | "Compact" >> CompactCaptions(output, target_bytes)
    try:
        stop.result = result = pipeline.run()
        if submitted_only(options):
            print(f"beam-captions compact: job built and handed to {options.get_all_options()['runner']}; "
                  "no run happened here")
            return {}
        result.wait_until_finish()
    except BaseException:
        if stop.signum is not None:  # a runner that reports the stop (a cancelled job) as an error
            stop.stop()
        raise
    if not stop.ended():  # a signal came before the run ended (no merge starts after it): the stop line
        stop.stop()
    counts = counters(result)
    broke = _unreadable_line(counts, unreadable_files())
    if broke:  # one line, then the summary (its first line says so), exit 1
        print(f"beam-captions: error: compact {args.output}: {broke}", file=sys.stderr, flush=True)
    print(f"{first_line('beam-captions compact', time.monotonic() - started, error=broke)}\n"
          + _leftovers_line(counts)
          + f"  files            {counts.get('files_before', 0)} before, {counts.get('files_after', 0)} after "
          f"({counts.get('files_merged', 0)} merged into {counts.get('files_written', 0)})"
          + ("" if broke else  # the rows are not all known, and no manifest is written
             f"\n  rows             {counts.get('rows', 0)} of {plural(counts.get('clips_in_table', 0), 'clip')}"
             f" ({plural(counts.get('rows_stale_dropped', 0), 'stale row')} dropped)\n"
             f"  manifest         {FileSystems.join(output, 'captions', MANIFEST)}"), flush=True)
    if broke:
        raise SystemExit(1)
    return counts


def _unreadable_line(counts: dict[str, int], unreadable: list[str]) -> Optional[str]:
    """Why a compaction that met files it could not read broke (they are left as they are, the rest merged;
    no manifest): the first one's ``cannot read FILE: reason`` where the job ran in this process."""
    from beam_captions.summary import plural

    if not (counts.get("files_unreadable") or unreadable):
        return None
    if not unreadable:  # a runner elsewhere: its log names them
        return f"{plural(counts['files_unreadable'], 'file')} could not be read (the job's log names them)"
    more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
    return f"{unreadable[0]}{more} (left as it is; the other files are merged, no manifest is written)"


def _leftovers_line(counts: dict[str, int]) -> str:
    """What a compaction killed part way had left, removed before this one planned: the small files its
    journals still named, its staged copies no journal names; empty when there were none."""
    from beam_captions.summary import plural

    journals, removed = counts.get("compactions_finished", 0), counts.get("leftover_files_removed", 0)
    strays = counts.get("staged_files_removed", 0)
    if not (journals or removed or strays):
        return ""
    return (f"  leftovers        {plural(removed + strays, 'file')} removed: {removed} already merged "
            f"({plural(journals, 'killed compaction')} finished), "
            f"{plural(strays, 'staged copy', 'staged copies')} no journal names\n")


def _target_bytes(text: str) -> Optional[int]:
    """``--target-size-mb`` in bytes: a finite number of megabytes above zero (at least one byte), else None."""
    import math

    try:
        megabytes = float(text)
    except ValueError:
        return None
    size = megabytes * 2**20
    if not math.isfinite(size) or size < 1:
        return None
    return int(size)


def _compact_usage_error(message: str) -> None:
    print(f"beam-captions compact: error: {message} (see beam-captions compact --help)", file=sys.stderr, flush=True)
    raise SystemExit(2)


def command(argv: Sequence[str]) -> int:
    """``compact``'s exit status: 0 done, 2 refused before any work, 1 broke (one line, naming the file it could
    not read where that was why), 130 / 143 stopped."""
    try:
        compact(argv)
    except Exception as error:  # noqa: BLE001 - a damaged output (a Delta data file gone): one line
        logging.getLogger("beam_captions").info("the compaction failed", exc_info=True)
        print(f"beam-captions: error: compact {compact_arguments(argv)[0].output}: {one_line_error(error)}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    return 0
