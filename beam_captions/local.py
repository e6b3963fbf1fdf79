"""Local runs use every core: the DirectRunner gets one worker thread per core, in one process.

Threads, not processes: decoding and WebP encoding release the GIL inside FFmpeg, and one process
keeps one vLLM engine per GPU (the engine cache is per process) and the live progress right.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

__all__ = [
    "available_cores", "is_dataflow_runner", "is_local_runner", "local_beam_args", "local_runner",
    "runs_in_this_process",
]

_DIRECT_RUNNERS = frozenset({"direct", "directrunner", "switchingdirectrunner"})
_DATAFLOW_RUNNERS = frozenset({"dataflow", "dataflowrunner", "testdataflowrunner"})
_USER_CHOICES = ("--direct_num_workers", "--direct_running_mode")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_local_runner(runner: Optional[str]) -> bool:
    """Whether ``runner`` (a ``--runner`` value; None for the default) is the DirectRunner, which runs here
    (in this process, or in local worker processes of its multi-processing mode)."""
    return runner is None or (isinstance(runner, str) and runner.lower() in _DIRECT_RUNNERS)


def is_dataflow_runner(runner: object) -> bool:
    """Whether ``runner`` (a ``--runner`` value: a name, a dotted path or a runner object) is Dataflow's,
    whose job runs on Google Cloud, not in this process."""
    if runner is None:
        return False
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.rsplit(".", 1)[-1].lower() in _DATAFLOW_RUNNERS


def _runner(beam_args: Sequence[str]) -> Optional[str]:
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(list(beam_args)).get_all_options()["runner"]


def local_beam_args(beam_args: Sequence[str], workers: Optional[int], streaming: bool) -> list[str]:
    """``beam_args`` plus ``workers`` (default: every core) threads for a batch DirectRunner run.

    Left as they are: other runners, streaming (the DirectRunner runs it on its own executor), and
    runs where the user chose ``--direct_num_workers`` or ``--direct_running_mode``.
    """
    args = list(beam_args)
    runner = _runner(args)
    if streaming or not is_local_runner(runner):
        return args
    if any(arg.split("=", 1)[0] in _USER_CHOICES for arg in args):
        return args
    workers = workers or available_cores()
    if workers == 1:
        return args
    return [*args, f"--direct_num_workers={workers}", "--direct_running_mode=multi_threading"]


def runs_in_this_process(beam_args: Sequence[str]) -> bool:
    """Whether a batch job with ``beam_args`` runs its steps in this process: the DirectRunner on its
    threads or in the caller's thread (not its multi-processing mode, nor another runner)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(beam_args)).get_all_options()
    return is_local_runner(options["runner"]) and options.get("direct_running_mode") != "multi_processing"


def local_runner(options) -> Optional[object]:
    """The runner object for a job with these Beam ``options``: for a local run (no ``--runner``, or the
    DirectRunner named) Beam's DirectRunner with Prism off; None for any other runner (Beam makes the
    one ``--runner`` names, ``--runner PrismRunner`` included)."""
    if not is_local_runner(options.get_all_options()["runner"]):
        return None
    return _direct_runner_class()()


_RUNNER_CLASS = None


def _direct_runner_class():
    """``SwitchingDirectRunner`` without Prism (made once, on first use: importing Beam's runners is slow)."""
    global _RUNNER_CLASS
    if _RUNNER_CLASS is not None:
        return _RUNNER_CLASS
    from apache_beam.runners.direct import direct_runner

    class SwitchingDirectRunner(direct_runner.SwitchingDirectRunner):
        """Beam's DirectRunner as the tests run it: the FnApiRunner, or the BundleBasedDirectRunner for what
        the FnApiRunner cannot run (a Pub/Sub read or write, a TestStream, ...), chosen as Beam 2.78 chooses
        between them. Never Prism: Beam's own DirectRunner tries Prism first (downloading its binary from
        Beam's release page) and falls back to these when that fails; this one never tries. Logs which
        runner runs the job. Keeps Beam's class name: ``Pipeline.run`` recognises the DirectRunner by it
        (a batch job goes to the FnApiRunner without a runner-API round trip)."""

        def run_pipeline(self, pipeline, options):
            runner = self.choose(pipeline, options)
            logging.getLogger("beam_captions").info("local runner: %s (Prism off)", type(runner).__name__)
            return runner.run_pipeline(pipeline, options)

        @staticmethod
        def choose(pipeline, options):
            """The runner that runs ``pipeline``, made as Beam 2.78's DirectRunner makes it."""
            if not _fn_api_runner_can_run(pipeline):
                return direct_runner.BundleBasedDirectRunner()
            from apache_beam.portability.api import beam_provision_api_pb2
            from apache_beam.runners.portability.fn_api_runner import fn_runner
            from apache_beam.runners.portability.portable_runner import JobServiceHandle

            encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
            return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
                beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))

    _RUNNER_CLASS = SwitchingDirectRunner
    return _RUNNER_CLASS


def _fn_api_runner_can_run(pipeline) -> bool:
    """Whether the FnApiRunner can run ``pipeline``: Beam 2.78's own test in ``SwitchingDirectRunner``
    (``_FnApiRunnerSupportVisitor``, a class local to its ``run_pipeline``)."""
    import itertools

    import apache_beam as beam
    from apache_beam.internal.util import ArgumentPlaceholder
    from apache_beam.io.gcp.pubsub import ReadFromPubSub, WriteToPubSub
    from apache_beam.pipeline import PipelineVisitor
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms import userstate
    from apache_beam.transforms.core import CombineValuesDoFn
    from apache_beam.transforms.timeutil import TimeDomain

    class Visitor(PipelineVisitor):
        supported = True

        def enter_composite_transform(self, applied):
            if isinstance(applied.transform, (ReadFromPubSub, WriteToPubSub)):
                self.supported = False

        def visit_transform(self, applied):
            transform = applied.transform
            if isinstance(transform, TestStream):
                self.supported = False
            if isinstance(transform, beam.ParDo):
                dofn = transform.dofn
                if isinstance(dofn, CombineValuesDoFn):
                    args, kwargs = transform.raw_side_inputs
                    if any(isinstance(arg, ArgumentPlaceholder) for arg in itertools.chain(args, kwargs.values())):
                        self.supported = False
                if userstate.is_stateful_dofn(dofn):
                    _, timers = userstate.get_dofn_specs(dofn)
                    if any(timer.time_domain == TimeDomain.REAL_TIME for timer in timers):
                        self.supported = False

    visitor = Visitor()
    pipeline.visit(visitor)
    return visitor.supported
