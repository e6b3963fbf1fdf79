"""What a run checks before any work: its inputs exist, its output can be written and holds no table of the
other format, and no other live run holds the output (the lease). Each refusal is one line and exit 2."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from beam_captions.cli.errors import one_line_error, refuse


def take_lease(output: str, force: bool, job: bool = False):
    """This run's lease of ``output`` (``OUT/_lease.json``); refused (exit 2) where another live run holds it,
    unless ``force``. A stale lease (a local run's process gone, or not refreshed for its stated timeout) is
    taken over. ``job``: the job runs elsewhere (not the DirectRunner): its workers refresh the lease too,
    and it outlives this process's PID (``io.lease``)."""
    from beam_captions.io.lease import JOB, LEASE_NAME, PROCESS, Lease, LeaseHeld, describe_holder, holder_is_live

    try:
        lease = Lease.take(output, force, runs_in=JOB if job else PROCESS)
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
        check_inputs(config.input, streaming=config.streaming, output=config.output)
    except InputError as error:
        refuse(str(error))


def refuse_unwritable_output(output: str, label: str = "--output", create: bool = True) -> None:
    """A local output root must be a folder this process can create files in; checked before any clip is
    decoded. (An object store is checked by its first write.) ``label`` names what the one line is about
    (``--output``, ``gallery``, ``compact``); ``create``: make the root if need be (only a run: the others
    never make a folder)."""
    from beam_captions.io.paths import is_local, local_path

    if not is_local(output):
        return
    root = local_path(output)
    for folder in (root, *(os.path.join(root, name) for name in ("captions", "previews", "metas", "failures"))):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            refuse(f"{label} {root}: cannot write there: {folder} is a file, not a folder")
    try:
        if create:
            os.makedirs(root, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=root, prefix=".tmp-write-check-")
        try:
            os.write(handle, b"beam-captions")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        refuse(f"{label} {root}: cannot write there: {error.strerror or error}"
                + (f" ({error.filename})" if error.filename and error.filename != root else ""))


def refuse_missing_output(command: str, output: str) -> None:
    """A local path that is not a folder, for a command that reads an output (``gallery``, ``compact``): one line,
    exit 2, and nothing made there (a misspelt path must not become a new folder)."""
    from beam_captions.io.paths import is_local, local_path

    if is_local(output) and not os.path.isdir(local_path(output)):
        refuse(f"{command} {output}: " + ("not a folder" if os.path.lexists(local_path(output)) else "no such folder"))


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
