"""ReadClips: find the video files named by a path, a folder or a glob (local or gs://)."""

from __future__ import annotations

import os
from typing import Sequence, Union

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.fileio import EmptyMatchTreatment
from apache_beam.utils.timestamp import Timestamp

from beam_captions.metrics import count
from beam_captions.records import ClipRef

__all__ = ["VIDEO_EXTENSIONS", "ReadClips", "WatchClips", "is_video_path", "to_match_pattern"]

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}
)
_GLOB_CHARS = frozenset("*?[")


def is_video_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def to_match_pattern(location: str) -> str:
    """A file or glob stays as it is; anything else is a folder or prefix whose files are all matched."""
    if any(char in location for char in _GLOB_CHARS) or is_video_path(location):
        return location
    return location.rstrip("/") + "/**"


def _clip_ref(path: str) -> ClipRef:
    count("clips_found")
    return ClipRef.from_source(path)


class ReadClips(beam.PTransform):
    """``ClipRef``s for every video file matched by ``input_pattern`` (one location or several).

    Example: ``p | ReadClips("gs://bucket/raw/")`` or ``ReadClips(["a/*.mp4", "b/"])``. A file matched
    twice is read once.
    """

    def __init__(self, input_pattern: Union[str, Sequence[str]]):
        super().__init__()
        self.patterns = [input_pattern] if isinstance(input_pattern, str) else list(input_pattern)

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create([to_match_pattern(p) for p in self.patterns])
            | "Match" >> fileio.MatchAll(EmptyMatchTreatment.ALLOW)
            | "KeepVideos" >> beam.Filter(lambda metadata: is_video_path(metadata.path))
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
            | "Once" >> beam.Distinct()
            | "ToClipRef" >> beam.Map(_clip_ref)
        )


def _watched_clip_ref(metadata, timestamp=beam.DoFn.TimestampParam) -> ClipRef:
    """The clip's event time is the file's modification time, so a file reported twice lands in the
    same event-time window (its outputs are then rewritten, never duplicated)."""
    count("clips_found")
    return ClipRef.from_source(metadata.path, metadata.last_updated_in_seconds or float(timestamp))


class WatchClips(beam.PTransform):
    """``ClipRef``s of video files as they appear under one location, checked every ``interval_s``.

    Unbounded (streaming). A file seen again in a later check is not emitted twice.
    """

    def __init__(self, input_pattern: str, interval_s: float = 10.0):
        super().__init__()
        self.pattern = input_pattern
        self.interval_s = interval_s

    def expand(self, pbegin):
        return (
            pbegin
            | "Watch" >> fileio.MatchContinuously(
                to_match_pattern(self.pattern),
                interval=self.interval_s,
                has_deduplication=True,
                start_timestamp=Timestamp.now(),
                empty_match_treatment=EmptyMatchTreatment.ALLOW,
            )
            | "KeepVideos" >> beam.Filter(lambda metadata: is_video_path(metadata.path))
            | "ToClipRef" >> beam.Map(_watched_clip_ref)
        )
