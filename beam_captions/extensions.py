"""Which file names a folder scan takes as videos (no Beam here: the template tooling imports it)."""

from __future__ import annotations

import os
from typing import Iterable, Optional

__all__ = ["ANY_EXTENSION", "VIDEO_EXTENSIONS", "is_video_path", "parse_extensions"]

# Containers and elementary streams FFmpeg reads, by the names files carry.
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".mk3d", ".webm", ".avi", ".divx", ".wmv", ".asf", ".flv", ".f4v",
    ".mpg", ".mpeg", ".mpe", ".mpv", ".m1v", ".m2v", ".m2p", ".ps", ".vob", ".evo", ".mod", ".tod",
    ".ts", ".mts", ".m2ts", ".m2t", ".tts", ".trp", ".3gp", ".3g2", ".ogv", ".ogm", ".mxf", ".dv", ".dif",
    ".y4m", ".nut", ".ivf", ".rm", ".rmvb", ".wtv", ".dvr-ms", ".nsv", ".amv", ".mjpeg", ".mjpg",
    ".h264", ".264", ".h265", ".265", ".hevc", ".avc", ".obu",
})
ANY_EXTENSION = "*"


def parse_extensions(text: str) -> frozenset[str]:
    """``--input-extensions``: ``mp4,mov`` replaces the default set, ``+xyz,+abc`` adds to it, ``*`` takes every file.

    Case and leading dots do not matter. ``""`` (no extension) takes files without one.
    """
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError("--input-extensions needs at least one extension (or * for every file)")
    if items == [ANY_EXTENSION]:
        return frozenset({ANY_EXTENSION})
    added = [item.startswith("+") for item in items if item]
    if any(added) and not all(added):
        raise ValueError("--input-extensions either replaces the set (mp4,mov) or adds to it (+mts,+xyz), not both")
    names = set()
    for item in items:
        item = item.lstrip("+").lower()
        if any(ch in item for ch in "/\\*?[ "):
            raise ValueError(f"--input-extensions: {item!r} is not a file extension")
        names.add("." + item.lstrip(".") if item.lstrip(".") else "")
    return frozenset(names | VIDEO_EXTENSIONS) if all(added) else frozenset(names)


def is_video_path(path: str, extensions: Optional[Iterable[str]] = None) -> bool:
    """Whether a scan takes ``path``: its extension (any case) is in ``extensions`` (default ``VIDEO_EXTENSIONS``)."""
    extensions = VIDEO_EXTENSIONS if extensions is None else extensions
    if ANY_EXTENSION in extensions:
        return True
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[1].lower() in extensions
