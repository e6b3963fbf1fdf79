"""SkipFinishedClips: stamp each clip with its source's version and drop those an earlier run finished."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.metas import finished_for, read_meta, version_meta
from beam_captions.metrics import count
from beam_captions.records import ClipRef

__all__ = ["SkipFinishedClips", "source_version"]


class _SkipFinished(beam.DoFn):
    """Stamps each ``ClipRef`` with its source's version and drops those an earlier run finished."""

    def __init__(self, output: str, asked: dict[str, Any], skip_existing: bool, retry_failed: bool):
        self.output, self.asked = output, dict(asked)
        self.skip_existing, self.retry_failed = skip_existing, retry_failed

    def process(self, clip: ClipRef):
        if clip.version is None:
            clip = dataclasses.replace(clip, version=source_version(clip.source))
        meta = read_meta(self.output, clip.clip_id)  # also without skip_existing: the summary says why it is redone
        if finished_for(meta, self.asked, clip.version, self.retry_failed):
            if self.skip_existing:
                count("clips_skipped")
                return
            count("clips_not_skipped")  # finished, redone because --no-skip-existing asks
        elif meta is not None:
            if clip.version is not None and meta.get("source_version") not in (None, version_meta(clip.version)):
                count("clips_replaced")
            elif meta.get("status") == "failed":
                count("clips_retried")
            elif all(name in (meta.get("outputs") or {}) for name in self.asked):
                count("clips_other_settings")  # each asked output is there, one made differently
            else:
                count("clips_extended")  # an asked output is missing
        yield clip


def source_version(source: str) -> Optional[tuple[int, float]]:
    """``(size, last modified)`` of ``source`` through Beam's filesystems (local mtime; on gs:// the
    object's update time, which a new generation changes), or ``None`` if it cannot be read."""
    try:
        found = FileSystems.get_filesystem(source).metadata(source)
    except Exception:  # noqa: BLE001 - missing: decoding will say so
        return None
    return int(found.size_in_bytes), float(found.last_updated_in_seconds or 0.0)


class SkipFinishedClips(beam.PTransform):
    """Stamp ``ClipRef``s with their source's version and (``skip_existing``) drop those whose metas
    says they are done for every output ``asked``, from the same source version: failed clips are
    tried again unless ``retry_failed`` is off, replaced files and clips missing an asked output are redone."""

    def __init__(self, output: str, asked: Optional[dict[str, Any]] = None, skip_existing: bool = True,
                 retry_failed: bool = True):
        super().__init__()
        self.output = output
        self.asked = dict(asked or {})
        self.skip_existing, self.retry_failed = skip_existing, retry_failed

    def expand(self, clips):
        return clips | "Unfinished" >> beam.ParDo(
            _SkipFinished(self.output, self.asked, self.skip_existing, self.retry_failed))
