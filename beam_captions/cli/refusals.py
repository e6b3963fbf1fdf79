"""What a run checks before any work: its inputs exist, its output can be written and holds no table of the
other format, and no other live run holds the output (the lease). Each refusal is one line and exit 2."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from beam_captions.cli.errors import one_line_error, refuse


def take_lease(output: str, force: bool):
    """This run's lease of ``output`` (``OUT/_lease.json``); refused (exit 2) where another live run holds it,
    unless ``force``. A stale lease (its process gone, or not refreshed for 5 minutes) is taken over."""
    from beam_captions.io.lease import LEASE_NAME, Lease, LeaseHeld, describe_holder, holder_is_live

    try:
        lease = Lease.take(output, force)
    except LeaseHeld as held:
        refuse(f"--output {held}: wait for it to end, or give --force to run anyway (both runs would then "
                "make every clip)")
    except Exception as error:  # noqa: BLE001 - e.g. a bucket this process may not write to
        refuse(f"--output {output}: cannot write its lease {LEASE_NAME}: {one_line_error(error)}")
    if force and holder_is_live(lease.displaced):
        print(f"beam-captions: warning: --force: {output} is also used by another run "
              f"({describe_holder(lease.displaced)})", file=sys.stderr, flush=True)
    return lease


def refuse_missing_inputs(config) -> None:
    from beam_captions.transforms.read import InputError, check_inputs

    try:
        check_inputs(config.input, streaming=config.streaming)
    except InputError as error:
        refuse(str(error))


def refuse_unwritable_output(output: str) -> None:
    """A local output root must be a folder this process can create files in; checked before any clip is
    decoded. (An object store is checked by its first write.)"""
    from beam_captions.io.paths import is_local, local_path

    if not is_local(output):
        return
    root = local_path(output)
    for folder in (root, *(os.path.join(root, name) for name in ("captions", "previews", "metas", "failures"))):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            refuse(f"--output {root}: cannot write there: {folder} is a file, not a folder")
    try:
        os.makedirs(root, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=root, prefix=".tmp-write-check-")
        try:
            os.write(handle, b"beam-captions")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        refuse(f"--output {root}: cannot write there: {error.strerror or error}"
                + (f" ({error.filename})" if error.filename and error.filename != root else ""))


def refuse_other_table_format(output: str, wanted: str) -> None:
    """An output whose captions table is of the other format (``--captions-table``) is refused before any
    work: a run never mixes plain Parquet files and a Delta table under ``OUT/captions``."""
    from beam_captions.io.delta import other_format_error

    try:
        error = other_format_error(output, wanted)
    except Exception as failure:  # noqa: BLE001 - cannot tell: the output's first write will say why
        logging.getLogger("beam_captions").info("could not list %s: %s", output, failure)
        return
    if error:
        refuse(error)
