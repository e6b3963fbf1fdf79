"""``beam-captions gallery OUT``: the review gallery of any output, local or gs://."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Sequence

from beam_captions.cli.errors import one_line_error, refuse


def command(argv: Sequence[str]) -> int:
    """Exit 2 before any work for a path that is not a run's output or cannot be written (it makes nothing
    there); what it cannot read (metas, failure records, the captions table) is listed under Failures and
    named in one warning line (exit 0); an error while writing the pages is one line and exit 1."""
    import argparse

    from beam_captions.cli.refusals import refuse_missing_output, refuse_unwritable_output
    from beam_captions.io.gallery import build_gallery, is_run_output

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
    refuse_missing_output("gallery", args.output)  # nothing is written unless OUTPUT is the output of a run
    if not is_run_output(args.output):
        refuse(f"gallery {args.output}: not the output of a run (no metas/ or failures/ under it)")
    refuse_unwritable_output(args.output, "gallery", create=False)
    started = time.monotonic()
    try:
        index, unread = build_gallery(args.output, args.clips_per_page)
    except Exception as error:  # noqa: BLE001 - e.g. a page that cannot be written: one line, the log has the rest
        logging.getLogger("beam_captions").info("gallery of %s failed", args.output, exc_info=True)
        print(f"beam-captions: error: gallery {args.output}: {one_line_error(error)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(f"{index}  ({time.monotonic() - started:.1f} s)")
    if unread:
        print(f"beam-captions: warning: gallery {args.output}: {_unread_line(unread)} (listed under Failures)",
              file=sys.stderr, flush=True)
    return 0


def _unread_line(unread: Sequence[dict[str, Any]]) -> str:
    """``could not read FILE: reason``, and how many more files there are like it."""
    first = unread[0]
    more = f" and {len(unread) - 1} more" if len(unread) > 1 else ""
    return f"could not read {first['source']}: {first['message']}{more}"
