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

Each clip carries its source's version from the listing (``ClipRef.version``: size and modification time
on a local disk; size, creation time and generation on gs://), so that no clip costs a request of its own.
A gs:// prefix or glob is listed in shards that spread over the workers (``io.listing``,
``SpreadListing``). A scan never takes what lies under ``exclude`` (the job's output, when it is inside
an input).
"""

from __future__ import annotations

import dataclasses

import glob
import os
import re
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.fileio import EmptyMatchTreatment
from apache_beam.utils.timestamp import Timestamp

from beam_captions.extensions import ANY_EXTENSION, VIDEO_EXTENSIONS, is_video_path, parse_extensions
from beam_captions.io.listing import Found, ListingPlan, Shard, gcs_object_version, list_shard, shard_for
from beam_captions.io.paths import is_local, local_path
from beam_captions.metrics import count
from beam_captions.records import ClipRef, SourceVersion
from beam_captions.transforms.listing import SHARDS, SpreadListing

__all__ = [
    "VIDEO_EXTENSIONS", "InputError", "ReadClips", "WatchClips", "check_inputs", "is_local", "is_video_path",
    "list_found", "list_location", "normalise_source", "parse_extensions", "to_match_pattern", "within",
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


def within(path: str, root: Optional[str]) -> bool:
    """Whether ``path`` is ``root`` or lies under it (local paths compared as ``normalise_source`` gives them)."""
    if not root:
        return False
    if is_local(path) != is_local(root):
        return False
    if is_local(path):
        path, root = normalise_source(path), normalise_source(root)
        return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
    return path.rstrip("/") == root.rstrip("/") or path.startswith(root.rstrip("/") + "/")


def _local_version(path: str) -> Optional[SourceVersion]:
    """``(size, mtime)`` of a local file (through its links), ``None`` when it cannot be read (its failure
    record says why)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_size, found.st_mtime


def _scan_local(folder: str, extensions, exclude: Optional[str]) -> Iterator[str]:
    """Files under ``folder`` a scan takes; the others are counted. Links to folders are followed once;
    ``exclude`` (a folder) is left out whole."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or within(real, exclude):  # a link loop, a folder reached twice, the output
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


class _RemoteKeep:
    """Which listed objects a scan of an object store takes: not folder placeholders, nothing under
    ``exclude``, and (counting the others) those whose extension is in ``extensions``."""

    def __init__(self, extensions, exclude: Optional[str]):
        self.extensions, self.exclude = extensions, exclude

    def __call__(self, found: Found) -> bool:
        if found.path.endswith("/") or within(found.path, self.exclude):
            return False
        if is_video_path(found.path, self.extensions):
            return True
        count("files_ignored_not_video")
        return False


def _scan_remote(pattern: str, keep: _RemoteKeep) -> Iterator[Found]:
    """Another object store than gs:// (through Beam's filesystems, in one listing)."""
    for result in FileSystems.match([pattern]):
        for metadata in result.metadata_list:
            found = Found(metadata.path, (int(metadata.size_in_bytes), float(metadata.last_updated_in_seconds or 0.0)))
            if keep(found):
                yield found


def _start(location: str, extensions, exclude: Optional[str]) -> Iterator[Union[Found, Shard]]:
    """What listing ``location`` starts with: the clips of a local location, an explicit file, or the
    first shard of a gs:// prefix or glob (``SpreadListing`` lists it)."""
    if is_local(location):
        local = local_path(location)
        if os.path.isdir(local):
            found = _scan_local(local, extensions, exclude)
        elif os.path.lexists(local):
            found = iter([local])  # named explicitly: taken whatever it is
        elif _has_glob(local):
            found = _scan_matches(sorted(glob.glob(local, recursive=True)), extensions, exclude)
        else:
            found = iter([local])  # vanished since the check: its failure record says so
        for path in found:
            yield Found(normalise_source(path), _local_version(path))
        return
    keep = _RemoteKeep(extensions, exclude)
    if location.startswith("gs://"):
        version = None if location.endswith("/") or _has_glob(location) else gcs_object_version(location)
        if version is not None:
            yield Found(location, version)
        elif _has_glob(location):
            yield shard_for(location, glob_pattern=location)
        else:
            yield shard_for(location.rstrip("/") + "/")
        return
    if not location.endswith("/") and FileSystems.exists(location):
        metadata = FileSystems.get_filesystem(location).metadata(location)
        yield Found(location, (int(metadata.size_in_bytes), float(metadata.last_updated_in_seconds or 0.0)))
        return
    yield from _scan_remote(location if _has_glob(location) else location.rstrip("/") + "/**", keep)


def list_found(location: str, extensions: Optional[Iterable[str]] = None, plan: ListingPlan = ListingPlan(),
               exclude: Optional[str] = None) -> Iterator[Found]:
    """Every clip ``location`` names (see the module doc), normalised, with its version; files passed over
    are counted. Here the shards are listed one after the other (``ReadClips`` spreads them)."""
    extensions = VIDEO_EXTENSIONS if extensions is None else frozenset(extensions)
    pending = list(_start(location, extensions, exclude))
    keep = _RemoteKeep(extensions, exclude)
    while pending:
        item = pending.pop()
        if isinstance(item, Found):
            yield item
            continue
        for found in list_shard(item, plan):
            if isinstance(found, Shard):
                pending.append(found)
            elif keep(found):
                yield found
    count("listings_done")


def list_location(location: str, extensions: Optional[Iterable[str]] = None) -> Iterator[str]:
    """The paths of ``list_found``."""
    for found in list_found(location, extensions):
        yield found.path


def _scan_matches(paths: Sequence[str], extensions, exclude: Optional[str]) -> Iterator[str]:
    for path in paths:
        if within(path, exclude):
            continue
        if os.path.isdir(path):
            yield from _scan_local(path, extensions, exclude)
        elif is_video_path(path, extensions):
            yield path
        else:
            count("files_ignored_not_video")


def check_inputs(locations: Sequence[str], streaming: bool = False, output: Optional[str] = None) -> None:
    """Raise ``InputError`` for the first location that names nothing, or lies inside ``output`` (checked
    before any work).

    A streaming job may watch a ``gs://`` prefix that is still empty; a local folder must exist.
    """
    for location in locations:
        if not location.strip():
            raise InputError("--input must not be empty")
        if within(re.match(r"^[^[*?]*", location).group(0) or location, output):
            raise InputError(f"--input {location}: it is inside --output {output}, whose files a run never reads")
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


def _clip_ref(listed: tuple[str, Optional[SourceVersion]]) -> ClipRef:
    count("clips_found")
    path, version = listed
    return dataclasses.replace(ClipRef.from_source(path), version=version)


def _one(versions: Iterable[Optional[SourceVersion]]) -> Optional[SourceVersion]:
    """One version of a file listed more than once (by two locations): the same, unless it changed between."""
    return min(versions, key=repr)


class _StartListing(beam.DoFn):
    """The clips of one ``--input`` location, or the first shard of a gs:// one (``SpreadListing`` lists it)."""

    def __init__(self, extensions, exclude: Optional[str]):
        self.extensions, self.exclude = extensions, exclude

    def process(self, location: str):
        for item in _start(location, self.extensions, self.exclude):
            if isinstance(item, Shard):
                count(SHARDS)
            yield item
        count("listings_done")  # with the shards done, the progress line says every location has been listed


class ReadClips(beam.PTransform):
    """``ClipRef``s for every video file named by ``input_pattern`` (one location or several).

    Example: ``p | ReadClips("gs://bucket/raw/")`` or ``ReadClips(["a/*.mp4", "b/"])``. A file named
    twice (or by two paths) is read once. ``extensions`` is the set a scan takes (default
    ``VIDEO_EXTENSIONS``; ``{"*"}`` takes every file). ``exclude``: a folder or prefix a scan leaves out
    (the job's output). ``plan``: how a gs:// listing spreads (``io.listing.ListingPlan``).
    """

    def __init__(self, input_pattern: Union[str, Sequence[str]], extensions: Optional[Iterable[str]] = None,
                 exclude: Optional[str] = None, plan: ListingPlan = ListingPlan()):
        super().__init__()
        self.patterns = [input_pattern] if isinstance(input_pattern, str) else list(input_pattern)
        self.extensions = VIDEO_EXTENSIONS if extensions is None else frozenset(extensions)
        self.exclude = normalise_source(exclude) if exclude else None
        self.plan = plan

    def expand(self, pbegin):
        found = (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "List" >> beam.ParDo(_StartListing(self.extensions, self.exclude))
        )
        if any(pattern.startswith("gs://") for pattern in self.patterns):  # only gs:// is listed in shards
            found = found | "Shards" >> SpreadListing(self.plan, _RemoteKeep(self.extensions, self.exclude), counted=True)
        return (
            found
            | "ByPath" >> beam.Map(tuple).with_output_types(beam.typehints.KV[str, Any])
            | "Once" >> beam.CombinePerKey(_one)
            | "ToClipRef" >> beam.Map(_clip_ref)
        )


def _keep_watched(metadata, extensions, exclude: Optional[str]) -> bool:
    if within(metadata.path, exclude):
        return False
    if is_video_path(metadata.path, extensions):
        return True
    count("files_ignored_not_video")
    return False


def _watched_clip_ref(metadata, timestamp=beam.DoFn.TimestampParam) -> ClipRef:
    """The clip's event time is the file's modification time, so a file reported twice lands in the
    same event-time window (its outputs are then rewritten, never duplicated).

    The version (size, modification time) comes from the listing: a replaced file is a new version, so
    the writer redoes it rather than dropping it as a duplicate of the first delivery. On gs:// the
    listing's time is the object's ``updated``, which a change of metadata alone moves: the version
    (with its generation) is looked up instead (``SkipFinishedClips``)."""
    count("clips_found")
    clip = ClipRef.from_source(normalise_source(metadata.path), metadata.last_updated_in_seconds or float(timestamp))
    if metadata.last_updated_in_seconds and not metadata.path.startswith("gs://"):  # no second lookup per clip
        clip = dataclasses.replace(clip, version=(int(metadata.size_in_bytes), float(metadata.last_updated_in_seconds)))
    return clip


class WatchClips(beam.PTransform):
    """``ClipRef``s of video files as they appear under one location, checked every ``interval_s``.

    Unbounded (streaming). A file seen again in a later check is not emitted twice, unless its
    modification time changed (a file replaced with new content): that is emitted again, with its new
    version, and redone, as a batch run redoes a replaced file. Nothing under ``exclude`` is taken.
    """

    def __init__(self, input_pattern: str, interval_s: float = 10.0, extensions: Optional[Iterable[str]] = None,
                 exclude: Optional[str] = None):
        super().__init__()
        self.pattern = input_pattern
        self.interval_s = interval_s
        self.extensions = VIDEO_EXTENSIONS if extensions is None else frozenset(extensions)
        self.exclude = normalise_source(exclude) if exclude else None

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
            | "KeepVideos" >> beam.Filter(_keep_watched, self.extensions, self.exclude)
            | "ToClipRef" >> beam.Map(_watched_clip_ref)
        )
