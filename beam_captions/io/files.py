"""Whole-file writes through Beam FileSystems: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.paths import is_local, local_path

__all__ = [
    "UnreadableFile", "delete_quietly", "json_bytes", "matching", "parallel_map", "parse_json_object", "read_json", "read_json_or_none",
    "write_bytes", "write_json",
]

_T = TypeVar("_T")


class UnreadableFile(ValueError):
    """A file of an output that is there but cannot be read as what it should be (a damaged or foreign
    Parquet file): ``cannot read PATH: reason``, with ``path`` and ``reason``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path, self.reason = path, reason
IO_THREADS = 16  # small reads and writes on an object store wait on the network, not the CPU


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """This process's umask, read now (Linux: /proc; elsewhere by setting and restoring it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        with _UMASK_LOCK:
            mask = os.umask(0o022)
            os.umask(mask)
            return mask


def write_bytes(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """Write ``data`` to ``path``: locally to a temporary name then renamed; object stores commit on close."""
    if is_local(path):
        local = local_path(path)
        folder = os.path.dirname(local) or "."
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(local))
        try:
            os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes the file private; outputs are meant to be shared
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, local)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        return
    with FileSystems.create(path, mime_type=mime_type) as out:
        out.write(data)


def json_bytes(document: Any) -> bytes:
    """``document`` as stable, pretty JSON (sorted keys, so re-runs give the same bytes)."""
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: str, document: Any) -> None:
    """``document`` written as ``json_bytes``."""
    write_bytes(path, json_bytes(document), "application/json")


def read_json(path: str) -> Any:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def parallel_map(function: Callable[[Any], _T], items: Sequence[Any], threads: int = IO_THREADS) -> list[_T]:
    """``[function(item) for item in items]`` on up to ``threads`` threads (for many small file operations)."""
    items = list(items)
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(function, items))


def parse_json_object(data: Optional[bytes]) -> Optional[dict]:
    """``data`` as a JSON object, ``None`` when there is no data or it is not one (a foreign file)."""
    if data is None:
        return None
    try:
        document = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def read_json_or_none(path: str) -> Optional[dict]:
    """The JSON object at ``path``, or ``None`` when there is none or it is not a JSON object (a foreign
    file counts as none). An error while reading (permissions, the network) is raised: "cannot tell" is
    never taken for "not there"."""
    if not FileSystems.exists(path):
        return None
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except FileNotFoundError:  # deleted between the two calls
        return None
    return parse_json_object(data)


def matching(pattern: str) -> list[Any]:
    """Beam ``FileMetadata`` of every file matching ``pattern`` (none when its folder does not exist;
    a listing error is raised, never taken for "nothing there")."""
    return [m for result in FileSystems.match([pattern]) for m in result.metadata_list]


def delete_quietly(paths: Iterable[str]) -> None:
    """Delete ``paths``; those already gone (a concurrent writer, a retried bundle) are no error."""
    paths = list(paths)
    if not paths:
        return
    try:
        FileSystems.delete(paths)
    except Exception:  # noqa: BLE001 - one missing path fails the batch: delete one by one
        for path in paths:
            try:
                FileSystems.delete([path])
            except Exception:  # noqa: BLE001
                pass
