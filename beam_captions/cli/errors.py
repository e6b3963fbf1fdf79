"""One-line errors every command shares: a refusal before any work (exit 2), the reason a run broke, and
whether the runner only built the job."""

from __future__ import annotations

import re
import sys
from typing import Optional


def refuse(message: str) -> None:
    """A one-line error and exit status 2, before any work (as the flag parser does)."""
    print(f"beam-captions: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def one_line_error(error: BaseException) -> str:
    """The reason a run broke, in one line: the file of an output that could not be read, or the operating
    system's own words, when one is behind it."""
    from beam_captions.io.files import UnreadableFile

    seen = set()
    cause: Optional[BaseException] = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, UnreadableFile):
            return str(cause)
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.filename}: {cause.strerror}" if cause.filename else cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(error)
    found = re.search(r"\[Errno \d+\] [^\n]*", text)
    if found:
        return found.group(0).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else repr(error)}"[:500]


def submitted_only(options) -> bool:
    """A dry run or a template build: the runner returns without running anything."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, TestOptions

    return bool(options.view_as(TestOptions).dry_run or options.view_as(GoogleCloudOptions).template_location)
