"""``beam-captions``: run a caption job (``cli.run``).

Also ``beam-captions tiny-models DIR`` and ``sample-clips DIR`` (``cli.tools``), ``gallery OUT`` (``cli.gallery``)
and ``compact OUT`` (``cli.compact_output``). How Ctrl-C and SIGTERM stop a run or a compaction: ``cli.stops``; the checks
and the lease before any work: ``cli.refusals``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional, Sequence

from beam_captions.cli import compact_output, gallery, tools
from beam_captions.cli.compact_output import compact
from beam_captions.cli.run import run_job

__all__ = ["compact", "main", "run_job"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"tiny-models": tools.tiny_models, "sample-clips": tools.sample_clips, "gallery": gallery.command,
                "compact": compact_output.command}
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
