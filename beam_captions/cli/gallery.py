"""``beam-captions gallery OUT``: the review gallery of any output, local or gs://."""

from __future__ import annotations

import os
import time
from typing import Sequence

from beam_captions.cli.errors import refuse


def command(argv: Sequence[str]) -> int:
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
        refuse(f"gallery {args.output}: " + ("not a folder" if os.path.lexists(local_path(args.output))
                                              else "no such folder"))
    if not is_run_output(args.output):
        refuse(f"gallery {args.output}: not the output of a run (no metas/ or failures/ under it)")
    started = time.monotonic()
    print(f"{write_gallery(args.output, args.clips_per_page)}  ({time.monotonic() - started:.1f} s)")
    return 0
