"""Whole-file writes through Beam FileSystems: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from apache_beam.io.filesystems import FileSystems

__all__ = ["write_bytes", "write_json", "read_json"]


def write_bytes(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """Write ``data`` to ``path``: locally to a temporary name then renamed; object stores commit on close."""
    if FileSystems.get_scheme(path) in (None, "file"):
        local = path[len("file://"):] if path.startswith("file://") else path
        folder = os.path.dirname(local) or "."
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(local))
        try:
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


def write_json(path: str, document: Any) -> None:
    """``document`` as stable, pretty JSON (sorted keys, so re-runs give the same bytes)."""
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode("utf-8"), "application/json")


def read_json(path: str) -> Any:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))
