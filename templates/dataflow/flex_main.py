"""Flex Template entry point (``FLEX_TEMPLATE_PYTHON_PY_FILE``): template parameters -> ``beam-captions`` flags.

The launcher runs ``python flex_main.py --input=gs://... --generate_captions=true --runner=DataflowRunner
--project=... --region=... --staging_location=... --temp_location=... [--sdk_container_image=...]``: every
template parameter of ``metadata.json`` arrives as ``--<dest>=<value>`` and a switch as ``true``/``false``.
This turns them back into the CLI's own flags (``--generate-captions``, ``--no-skip-existing``,
``--model-dir=...``), leaves Beam's options as they are, adds ``--sdk_location=container`` (the worker
image already holds this Beam SDK, so nothing is staged) unless given, validates them exactly as
``beam-captions`` does, builds the same pipeline, and submits it.

It does not wait for the job to finish: the launcher's work ends once the job is handed to Dataflow
(with ``--template_location`` set, Beam writes the job file there instead of submitting it itself), so
the summary and the gallery that ``beam-captions`` prints and writes after a local run are not made here.

One writer per output: before submitting, it takes the output's lease for the job (``OUT/_lease.json``,
``runs_in: job``; on gs:// with a generation precondition) and is refused, like ``beam-captions``, when a
live run holds it (``--force`` joins it). The job's workers keep the lease fresh and its last step gives it
back (``transforms.hold_lease``); a job that dies leaves a lease that goes stale 30 minutes after its last
refresh (``io.lease.JOB_STALE_S``). A failed submission gives it back at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

__all__ = ["to_cli_args", "switch_flag", "main"]


def switch_flag(action: argparse.Action, value: bool) -> Optional[str]:
    """The CLI flag that sets the switch ``action`` to ``value`` (None: leave the flag out)."""
    if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
        return next(o for o in action.option_strings if o.startswith("--no-") == (not value))
    return action.option_strings[0] if value == action.const else None  # store_true / store_false


def to_cli_args(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None) -> list[str]:
    """The ``beam-captions`` command line for the launcher's ``argv``."""
    if parser is None:
        from beam_captions.options import build_parser

        parser = build_parser()
    flags = {action.dest: action for action in parser._actions if action.option_strings}
    args: list[str] = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        action = flags.get(name.replace("-", "_")) if sep else None
        if action is None or isinstance(action, argparse._HelpAction):
            args.append(arg)  # a Beam option (or an already CLI-shaped flag)
        elif action.nargs == 0:  # a switch
            if value.strip().lower() not in ("true", "false"):
                raise SystemExit(f"beam-captions: error: --{name} takes true or false, not {value!r}")
            flag = switch_flag(action, value.strip().lower() == "true")
            if flag:
                args.append(flag)
        else:
            args.append(f"{action.option_strings[0]}={value}")  # one token: a value may start with '-'
    if not any(a == "--sdk_location" or a.startswith("--sdk_location=") for a in args):
        args.append("--sdk_location=container")
    return args


def _prepare_captions_table(config) -> None:
    """As ``beam-captions`` does before its pipeline: refuse an output that holds the other table format;
    on a Delta output, make the table and commit the rows an earlier job left staged."""
    from beam_captions.io.delta import DELTA, ensure_table, other_format_error
    from beam_captions.io.delta_committer import commit_leftovers

    error = other_format_error(config.output, config.captions_table)
    if error:
        raise SystemExit(f"beam-captions: error: {error}")
    if config.captions_table == DELTA:
        ensure_table(config.output)
        done = commit_leftovers(config.output)
        logging.getLogger("beam_captions").info("committed %d clips an earlier job left staged",
                                                done.get("delta_clips_committed", 0))


def main(argv: Optional[Sequence[str]] = None):
    """Build and submit the job; returns Beam's ``PipelineResult`` (no waiting)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_captions.options import parse_args
    from beam_captions.pipeline import build_pipeline

    config, beam_args = parse_args(to_cli_args(sys.argv[1:] if argv is None else argv))
    lease = _take_lease(config)
    try:
        _prepare_captions_table(config)
        if getattr(config, "streaming", False) and "--streaming" not in beam_args:
            beam_args = [*beam_args, "--streaming"]  # as beam_captions.cli.run.run_job does
        pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
        build_pipeline(pipeline, config, lease.token)
        result = pipeline.run()
    except BaseException:
        lease.release()  # nothing was submitted: the output is free again
        raise
    lease.leave_to_job()
    return result


def _take_lease(config):
    """The output's lease, taken for the job (its workers refresh it, its last step gives it back); one line
    and exit 2 where a live run holds it, as ``beam-captions`` is refused."""
    from beam_captions.io.lease import JOB, Lease, LeaseHeld

    try:
        return Lease.take(config.output, config.force, runs_in=JOB, refresh=False)
    except LeaseHeld as held:
        raise SystemExit(f"beam-captions: error: --output {held}: wait for it to end, or give force=true to run "
                         "anyway") from None


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)  # the launcher's log then shows Beam's staging and submission
    main()
