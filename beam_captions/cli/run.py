"""``beam-captions [flags]``: run a caption job and print its summary."""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Callable, Optional, Sequence

from beam_captions.cli.errors import one_line_error, refuse, submitted_only
from beam_captions.cli.refusals import (refuse_missing_inputs, refuse_other_table_format, refuse_unwritable_output,
                                        take_lease)
from beam_captions.cli.stops import StopOnSignal, stop_line
from beam_captions.logs import restore_terminal, terminal


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
    built_only = submitted_only(options)
    logs = lease = None
    stop: Optional[StopOnSignal] = None
    delta = None  # a Delta output's committer while this process waits for the job (io.delta_committer.CommitLoop)
    if not built_only:
        refuse_missing_inputs(config)
        refuse_unwritable_output(config.output)
        refuse_other_table_format(config.output, config.captions_table)
        from beam_captions.local import is_local_runner

        # a job that runs elsewhere (not the DirectRunner) holds the lease itself: it may outlive this process
        lease = take_lease(config.output, config.force, job=not is_local_runner(options.get_all_options()["runner"]))
        try:
            logs = setup_logging(config.output, config.log_file, config.verbose)
        except OSError as error:
            lease.release()
            refuse(f"--log-file {config.log_file or ''}: cannot write there: {error.strerror or error}")
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
        build_pipeline(pipeline, config, lease.token if lease is not None and lease.runs_in == "job" else None,
                       delta_commit_in_job=built_only)  # a job nobody waits for commits in a step of its own
        if config.captions_table == "delta" and not built_only:
            delta = _start_delta_committer(config.output)

        def finish(result, error: Optional[str] = None) -> dict[str, int]:
            """The summary (its first line: finished, stopped, or broke with ``error``) and the gallery."""
            stopped = stop.signum is not None
            restore_terminal()  # the summary reaches the terminal, even if an engine is starting right now
            if release_models or stopped:
                release_engines(wait=not stopped)  # a stop does not wait for an engine in the middle of its start
            counts = counters(result) if result is not None else progress.snapshot()
            if delta is not None:  # what it committed; a run that did not end: the clips left staged
                counts = {**counts, **delta.counts()}
            gallery = write_gallery(config.output) if config.gallery else "not written (--no-gallery)"
            print(format_summary(counts, config.output, time.monotonic() - started, captions=config.generate_captions,
                                 stopped=stopped, error=None if stopped else error))
            print(f"  gallery          {gallery}", flush=True)
            if logs is not None:
                print(f"  log              {logs.copy_to or logs.path}", flush=True)
            return counts

        result = None
        stop = StopOnSignal(lambda: finish(None))
        try:
            reporter = ProgressReporter(terminal(), captions=config.generate_captions, locations=len(config.input),
                                        streaming=config.streaming)
            with reporter, stop:
                result = pipeline.run()
                result.wait_until_finish()
                if delta is not None:
                    delta.finish()  # the last pass: what the job staged since the previous one
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
            line, cancel = stop_line(result, options, config.cancel_on_stop)
            print(f"\nbeam-captions: {line}", file=terminal(), flush=True)
            if cancel:
                try:
                    result.cancel()
                except Exception:  # noqa: BLE001 - a runner that cannot cancel: the summary still comes
                    logging.getLogger("beam_captions").info("cancel failed", exc_info=True)
            elif result is not None and lease is not None:  # the job keeps running: it keeps the lease too
                lease.leave_to_job()
        if built_only:
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
        if delta is not None:
            delta.close()
        if lease is not None:
            lease.release()
        if logs is not None:
            logs.close(stopping=stop is not None and stop.signum is not None)


def _broke(error: BaseException, finish: Callable[..., object], failed_starts: Sequence[str] = ()) -> None:
    """The run itself broke (an output that cannot be written...): one line, the summary (its first line
    ``beam-captions broke after N s: <the reason>``), exit 1; the traceback is in the log file."""
    logging.getLogger("beam_captions").info("the run failed", exc_info=error)
    restore_terminal()
    # an engine that could not start: vLLM's own error says only "see root cause above"
    reason = failed_starts[-1] if failed_starts else one_line_error(error)
    print(f"beam-captions: error: {reason}", file=terminal(), flush=True)
    try:
        finish(None, reason)
    except Exception as again:  # noqa: BLE001 - the gallery cannot be written either
        print(f"beam-captions: error: {one_line_error(again)}", file=terminal(), flush=True)
    raise SystemExit(1) from None


def _start_delta_committer(output: str):
    """A Delta output: the committer of this run (``CommitLoop``), started: it makes the table if need be,
    commits what an earlier run left staged (and says so), then commits while the job runs. One line and
    exit 1 if its first pass fails."""
    from beam_captions.io.delta_committer import CommitLoop
    from beam_captions.summary import plural

    delta = CommitLoop(output)
    try:
        done = delta.start()
    except Exception as error:  # noqa: BLE001
        logging.getLogger("beam_captions").info("committing staged rows failed", exc_info=True)
        print(f"beam-captions: error: committing the rows an earlier run left staged in {output}: "
              f"{one_line_error(error)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if done.get("delta_clips_committed"):
        print(f"beam-captions: committed {plural(done['delta_clips_committed'], 'clip')} an earlier run left staged "
              f"in {output}", file=terminal(), flush=True)
    return delta
