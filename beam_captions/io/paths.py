"""Where every output lives under the output root (a local path or a gs:// prefix)."""

from __future__ import annotations

import os
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

__all__ = ["is_local", "local_path", "absolute_location", "caption_table_path", "captions_dir", "previews_dir", "metas_dir", "failures_dir", "preview_path", "meta_path", "failure_path"]


def is_local(location: str) -> bool:
    """Whether ``location`` is on this machine's filesystem (a plain path or a ``file://`` URI)."""
    return FileSystems.get_scheme(location) in (None, "file")


def local_path(location: str) -> str:
    """``location`` without a leading ``file://``."""
    return location[len("file://"):] if location.startswith("file://") else location


def absolute_location(location: str) -> str:
    """``location`` as recorded in outputs: a local path absolute (``file://`` dropped), so that the paths
    stored in rows and metas do not depend on the folder a run started in; a URI (``gs://...``) as it is."""
    return os.path.abspath(local_path(location)) if is_local(location) else location


def captions_dir(output: str) -> str:
    return FileSystems.join(output, "captions")


def previews_dir(output: str) -> str:
    """``OUT/previews``: one folder per clip id, one WebP per window."""
    return FileSystems.join(output, "previews")


def metas_dir(output: str) -> str:
    return FileSystems.join(output, "metas")


def failures_dir(output: str) -> str:
    return FileSystems.join(output, "failures")


def preview_path(output: str, clip_id: str, window: Any, end_frame: Optional[int] = None) -> str:
    """``OUT/previews/<clip_id>/<start_frame>_<end_frame>.webp``: the preview of one window.

    ``window`` is a ``WindowRecord``, a ``FrameWindow`` (anything with ``start_frame``/``end_frame`` or
    ``start``/``end``), a ``(start_frame, end_frame)`` pair, or the start frame with ``end_frame`` given.
    """
    if end_frame is not None:
        start_frame = int(window)
    elif hasattr(window, "start_frame"):
        start_frame, end_frame = window.start_frame, window.end_frame
    elif hasattr(window, "start") and hasattr(window, "end"):
        start_frame, end_frame = window.start, window.end
    else:
        start_frame, end_frame = window
    return FileSystems.join(previews_dir(output), clip_id, f"{int(start_frame)}_{int(end_frame)}.webp")


def meta_path(output: str, clip_id: str) -> str:
    return FileSystems.join(metas_dir(output), f"{clip_id}.json")


def failure_path(output: str, failure_name: str) -> str:
    return FileSystems.join(failures_dir(output), f"{failure_name}.json")


def caption_table_path(output: str, clip_id: str, partition: Optional[str] = None) -> str:
    """``OUT/captions/[<partition>/]<clip_id>.parquet``: the rows of one clip."""
    folder = FileSystems.join(captions_dir(output), partition) if partition else captions_dir(output)
    return FileSystems.join(folder, f"{clip_id}.parquet")
