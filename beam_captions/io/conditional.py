"""Writes and deletes that happen only if a file is still the version that was read.

A file's *token* names one version of it: ``g<generation>`` on gs:// (the object's generation, which
every write changes) and ``<size>:<mtime_ns>:<inode>`` on a local disk (an atomic replace makes a new
inode). ``None`` is "no such file".

On gs:// the check and the change are one request (``if_generation_match``): a concurrent writer's
version is never overwritten or deleted. A local disk has no such request: the token is checked right
before the change, which narrows the race to microseconds but cannot close it (compaction of a local
output is still safe against a writer of another process in all but that window).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from beam_captions.io.files import delete_quietly, write_bytes
from beam_captions.io.paths import is_local, local_path

__all__ = ["delete_if_unchanged", "file_token", "read_with_token", "remove_if_unchanged", "write_if_unchanged"]


def _gcs_client():
    """The storage client, one per storage endpoint (``STORAGE_EMULATOR_HOST`` may change within a process)."""
    return _gcs_client_for(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=4)
def _gcs_client_for(endpoint: Optional[str]):
    from apache_beam.io.gcp.gcsio import GcsIO

    return GcsIO().client


def _blob(path: str):
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    bucket, name = parse_gcs_path(path)
    return _gcs_client().bucket(bucket).blob(name)


def _not_found(error: Exception) -> bool:
    from google.api_core import exceptions

    return isinstance(error, exceptions.NotFound)


def _precondition_failed(error: Exception) -> bool:
    from google.api_core import exceptions

    return isinstance(error, (exceptions.PreconditionFailed, exceptions.NotFound))


def _local_token(path: str) -> Optional[str]:
    try:
        found = os.stat(local_path(path))
    except FileNotFoundError:
        return None
    return f"{found.st_size}:{found.st_mtime_ns}:{found.st_ino}"


def file_token(path: str) -> Optional[str]:
    """The token of the version of ``path`` there now, ``None`` when there is none. Other errors (a
    listing or permission error) are raised: "cannot tell" is never taken for "not there"."""
    if is_local(path):
        return _local_token(path)
    if not path.startswith("gs://"):
        raise ValueError(f"conditional changes are supported on local paths and gs:// only, not {path}")
    blob = _blob(path)
    try:
        blob.reload()
    except Exception as error:  # noqa: BLE001
        if _not_found(error):
            return None
        raise
    return f"g{blob.generation}"


def read_with_token(path: str) -> tuple[Optional[bytes], Optional[str]]:
    """The bytes of ``path`` and the token of exactly that version (``(None, None)`` when there is none)."""
    if is_local(path):
        local = local_path(path)
        try:
            with open(local, "rb") as handle:
                found = os.fstat(handle.fileno())
                return handle.read(), f"{found.st_size}:{found.st_mtime_ns}:{found.st_ino}"
        except FileNotFoundError:
            return None, None
    while True:  # the generation first, then exactly its bytes: a newer version in between reads again
        token = file_token(path)
        if token is None:
            return None, None
        try:
            return _blob(path).download_as_bytes(if_generation_match=int(token[1:])), token
        except Exception as error:  # noqa: BLE001
            if not _precondition_failed(error):
                raise


def write_if_unchanged(path: str, data: bytes, token: Optional[str], mime_type: str = "application/json") -> bool:
    """Write ``data`` to ``path`` if it is still the version ``token`` names (``None``: still absent);
    False (nothing written) when another version is there."""
    if is_local(path):
        if _local_token(path) != token:
            return False
        write_bytes(path, data, mime_type)
        return True
    generation = 0 if token is None else int(token[1:])
    try:
        _blob(path).upload_from_string(data, content_type=mime_type, if_generation_match=generation)
    except Exception as error:  # noqa: BLE001
        if _precondition_failed(error):
            return False
        raise
    return True


def delete_if_unchanged(path: str, token: Optional[str]) -> bool:
    """Delete ``path`` if it is still the version ``token`` names; True when it is gone (also when it
    already was), False when another version is there and was kept."""
    return remove_if_unchanged(path, token) is not False


def remove_if_unchanged(path: str, token: Optional[str]) -> Optional[bool]:
    """``delete_if_unchanged`` that tells what it did: True when this call deleted ``path``, None when it
    was already gone, False when another version is there and was kept."""
    if token is None:
        return None if file_token(path) is None else False
    if is_local(path):
        now = _local_token(path)
        if now is None:
            return None
        if now != token:
            return False
        delete_quietly([path])
        return True
    try:
        _blob(path).delete(if_generation_match=int(token[1:]))
    except Exception as error:  # noqa: BLE001
        from google.api_core import exceptions

        if isinstance(error, exceptions.NotFound):
            return None if file_token(path) is None else False
        if isinstance(error, exceptions.PreconditionFailed):
            return False
        raise
    return True
