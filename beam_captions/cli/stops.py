"""Ctrl-C and SIGTERM: how a run (``StopOnSignal``) and a compaction (``StopCompaction``) stop, and the line
that says what a stop did to the runner's job."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Callable, Optional

from beam_captions.logs import terminal
from beam_captions.stop_signals import StopSignals


def stop_line(result, options, cancel_on_stop: bool) -> tuple[str, bool]:
    """What Ctrl-C / SIGTERM does to the runner's job: the line that says so, and whether to cancel it.

    A local run's job is this process: it is cancelled. A Dataflow job runs on its own; as with Beam, the
    launcher only stops waiting for it and it keeps running, unless ``--cancel-on-stop`` asks to cancel it.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from beam_captions.local import is_dataflow_runner

    stopped = "stopped; what is finished is kept, a re-run completes the rest"
    if result is None or not is_dataflow_runner(options.get_all_options()["runner"]):
        return stopped, result is not None
    job = job_id(result)
    if cancel_on_stop:
        return f"{stopped} (cancelling the Dataflow job {job}, --cancel-on-stop)", True
    region = options.view_as(GoogleCloudOptions).region
    where = f" --region {region}" if region else ""
    return (f"stopped waiting; the Dataflow job {job} keeps running: cancel it with "
            f"`gcloud dataflow jobs cancel {job}{where}` or run with --cancel-on-stop"), False


def job_id(result) -> str:
    """The runner's id of a submitted job (``DataflowPipelineResult.job_id()``), or ``JOB_ID`` where it has none."""
    try:
        return str(result.job_id()) or "JOB_ID"
    except Exception:  # noqa: BLE001 - not known: the line still says what to do
        return "JOB_ID"


class StopOnSignal:
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

    def __enter__(self) -> "StopOnSignal":
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


class StopCompaction:
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

    def __enter__(self) -> "StopCompaction":
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
