"""ReadClips: find the video files named by a path, a folder or a glob (local or gs://).

What is taken:

* a file named explicitly (``--input clip.mts``, ``--input recording``) is always a clip, whatever its
  name; a name that exists is that file even when it holds glob characters (``movie [1080p].mp4``);
* a folder (or a ``gs://`` prefix) is scanned: every file under it whose extension is in the video set
  (``VIDEO_EXTENSIONS``, case-insensitive, or the set given to ``ReadClips``) is a clip, hidden ones
  included; every other file is counted (``files_ignored_not_video``), never dropped unseen;
* anything else holding ``*``, ``?`` or ``[`` is a glob: what it matches is scanned like a folder;
* in a scan, a symbolic link that points nowhere or loops, a FIFO or a folder named like a video is
  still a clip: its failure record says what it is (nothing is opened for reading while listing).

Local paths are made absolute and their symbolic links resolved before the clip id is made, so one
file reached by several paths (relative, ``./x``, a link) is one clip, in one run and across runs.
"""

from __future__ import annotations

import dataclasses

import glob
import os
from typing import Iterable, Iterator, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.fileio import EmptyMatchTreatment
from apache_beam.utils.timestamp import Timestamp

from beam_captions.extensions import ANY_EXTENSION, VIDEO_EXTENSIONS, is_video_path, parse_extensions
from beam_captions.io.paths import is_local, local_path
from beam_captions.metrics import count
from beam_captions.records import ClipRef

__all__ = [
    "VIDEO_EXTENSIONS", "InputError", "ReadClips", "WatchClips", "check_inputs", "is_local", "is_video_path",
    "list_location", "normalise_source", "parse_extensions", "to_match_pattern",
]

_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
    """An ``--input`` that names nothing; the message is one line."""


def normalise_source(path: str) -> str:
    """The form a clip id is made from: local paths absolute, links resolved (a dangling or looping link
    stays the absolute path of the link itself, so its failure record names it); other URIs as they are."""
    if not is_local(path):
        return path
    local = os.path.abspath(local_path(path))
    return os.path.realpath(local) if os.path.exists(local) else local


def _has_glob(location: str) -> bool:
    return any(char in location for char in _GLOB_CHARS)


def to_match_pattern(location: str) -> str:
    """A Beam match pattern for ``location``: a file stays itself, a folder or prefix matches all under it,
    a glob stays as it is. An existing local name has its glob characters escaped."""
    if is_local(location):
        local = local_path(location)
        if os.path.isdir(local):
            return glob.escape(local.rstrip("/")) + "/**"
        if os.path.lexists(local):
            return glob.escape(local)
        if _has_glob(local):
            return local
        return local.rstrip("/") + "/**"
    if _has_glob(location) or is_video_path(location):
        return location
    return location.rstrip("/") + "/**"


def _scan_local(folder: str, extensions) -> Iterator[str]:
    """Files under ``folder`` a scan takes; the others are counted. Links to folders are followed once."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in dirs:
            if os.path.splitext(name)[1] and is_video_path(name, extensions) and ANY_EXTENSION not in extensions:
                yield os.path.join(root, name)  # a folder named like a video: its failure record says so
        for name in sorted(files):
            if is_video_path(name, extensions):
                yield os.path.join(root, name)
            else:
                count("files_ignored_not_video")


def _scan_remote(pattern: str, extensions) -> Iterator[str]:
    for result in FileSystems.match([pattern]):
        for metadata in result.metadata_list:
            path = metadata.path
            if path.endswith("/"):  # a folder placeholder object
                continue
            if is_video_path(path, extensions):
                yield path
            else:
                count("files_ignored_not_video")


def list_location(location: str, extensions: Optional[Iterable[str]] = None) -> Iterator[str]:
    """Every clip ``location`` names (see the module doc), normalised; files passed over are counted."""
    extensions = VIDEO_EXTENSIONS if extensions is None else frozenset(extensions)
    if is_local(location):
        local = local_path(location)
        if os.path.isdir(local):
            found = _scan_local(local, extensions)
        elif os.path.lexists(local):
            found = iter([local])  # named explicitly: taken whatever it is
        elif _has_glob(local):
            found = _scan_matches(sorted(glob.glob(local, recursive=True)), extensions)
        else:
            found = iter([local])  # vanished since the check: its failure record says so
        for path in found:
            yield normalise_source(path)
    elif not location.endswith("/") and FileSystems.exists(location):
        yield location
    else:
        yield from _scan_remote(location if _has_glob(location) else location.rstrip("/") + "/**", extensions)
    count("listings_done")  # the progress line says when every location has been listed


def _scan_matches(paths: Sequence[str], extensions) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            yield from _scan_local(path, extensions)
        elif is_video_path(path, extensions):
            yield path
        else:
            count("files_ignored_not_video")


def check_inputs(locations: Sequence[str], streaming: bool = False) -> None:
    """Raise ``InputError`` for the first location that names nothing (checked before any work).

    A streaming job may watch a ``gs://`` prefix that is still empty; a local folder must exist.
    """
    for location in locations:
        if not location.strip():
            raise InputError("--input must not be empty")
        if is_local(location):
            local = local_path(location)
            if os.path.lexists(local):
                continue
            if _has_glob(local) and not streaming:
                if not glob.glob(local, recursive=True):
                    raise InputError(f"--input {location}: the pattern matches no file")
                continue
            if _has_glob(local):
                continue
            parent = os.path.dirname(os.path.abspath(local))
            reason = "no such file or folder" if os.path.isdir(parent) else f"no such folder {parent}"
            raise InputError(f"--input {location}: {reason}")
        if streaming:
            continue
        if _has_glob(location) and not FileSystems.exists(location):
            pattern = location
        elif FileSystems.exists(location):
            continue
        else:
            pattern = location.rstrip("/") + "/**"
        try:
            matched = FileSystems.match([pattern], limits=[1])[0].metadata_list
        except Exception as error:  # noqa: BLE001 - a missing bucket, no access...
            raise InputError(f"--input {location}: cannot be listed ({' '.join(str(error).split())[:300]})") from None
        if not matched:
            raise InputError(f"--input {location}: no such file or prefix (nothing matches)")


def _clip_ref(path: str) -> ClipRef:
    count("clips_found")
    return ClipRef.from_source(path)


class ReadClips(beam.PTransform):
    """``ClipRef``s for every video file named by ``input_pattern`` (one location or several).

    Example: ``p | ReadClips("gs://bucket/raw/")`` or ``ReadClips(["a/*.mp4", "b/"])``. A file named
    twice (or by two paths) is read once. ``extensions`` is the set a scan takes (default
    ``VIDEO_EXTENSIONS``; ``{"*"}`` takes every file).
    """

    def __init__(self, input_pattern: Union[str, Sequence[str]], extensions: Optional[Iterable[str]] = None):
        super().__init__()
        self.patterns = [input_pattern] if isinstance(input_pattern, str) else list(input_pattern)
        self.extensions = None if extensions is None else frozenset(extensions)

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "List" >> beam.FlatMap(list_location, self.extensions)
            | "Once" >> beam.Distinct()
            | "ToClipRef" >> beam.Map(_clip_ref)
        )


def _keep_watched(metadata, extensions) -> bool:
    if is_video_path(metadata.path, extensions):
        return True
    count("files_ignored_not_video")
    return False


def _watched_clip_ref(metadata, timestamp=beam.DoFn.TimestampParam) -> ClipRef:
    """The clip's event time is the file's modification time, so a file reported twice lands in the
    same event-time window (its outputs are then rewritten, never duplicated).

    The version (size, modification time) comes from the listing: a replaced file is a new version, so
    the writer redoes it rather than dropping it as a duplicate of the first delivery."""
    count("clips_found")
    clip = ClipRef.from_source(normalise_source(metadata.path), metadata.last_updated_in_seconds or float(timestamp))
    if metadata.last_updated_in_seconds:  # the listing already read the version: no second lookup per clip
        clip = dataclasses.replace(clip, version=(int(metadata.size_in_bytes), float(metadata.last_updated_in_seconds)))
    return clip


class WatchClips(beam.PTransform):
    """``ClipRef``s of video files as they appear under one location, checked every ``interval_s``.

    Unbounded (streaming). A file seen again in a later check is not emitted twice, unless its
    modification time changed (a file replaced with new content): that is emitted again, with its new
    version, and redone, as a batch run redoes a replaced file.
    """

    def __init__(self, input_pattern: str, interval_s: float = 10.0, extensions: Optional[Iterable[str]] = None):
        super().__init__()
        self.pattern = input_pattern
        self.interval_s = interval_s
        self.extensions = VIDEO_EXTENSIONS if extensions is None else frozenset(extensions)

    def expand(self, pbegin):
        return (
            pbegin
            | "Watch" >> fileio.MatchContinuously(
                to_match_pattern(self.pattern),
                interval=self.interval_s,
                has_deduplication=True,
                match_updated_files=True,  # keyed by (path, mtime): a replaced file is listed again
                start_timestamp=Timestamp.now(),
                empty_match_treatment=EmptyMatchTreatment.ALLOW,
            )
            | "KeepVideos" >> beam.Filter(_keep_watched, self.extensions)
            | "ToClipRef" >> beam.Map(_watched_clip_ref)
        )
