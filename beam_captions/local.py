"""Local runs use every core: the DirectRunner gets one worker thread per core, in one process.

Threads, not processes: decoding and WebP encoding release the GIL inside FFmpeg, and one process
keeps one vLLM engine per GPU (the engine cache is per process) and the live progress right.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

__all__ = [
    "MAX_LOCAL_WORKERS", "available_cores", "is_dataflow_runner", "is_local_runner", "local_beam_args",
    "runs_in_this_process",
]

MAX_LOCAL_WORKERS = 1024
"""The most worker threads ``--local-workers`` gives a local run: above the core count of any one machine
(the largest cloud VMs have under 1000 vCPUs), and each thread holds a clip's decode and frames in memory.
A documented number, not this machine's cores: the launcher of a Dataflow job is not its worker."""

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
