"""SkipFinishedClips: stamp each clip with its source's version and drop those an earlier run finished.

A batch run reads what is done once: one listing of ``OUT/metas/`` and of the done index ``OUT/done/``
(``io.done_index``), joined with the clips by clip id. A clip's metas is read only where the index says
to look closer; a clip without a metas costs nothing. A streaming run (clips arriving one by one) reads
each clip's metas.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Iterable, Optional, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_captions.io.done_index import (
    FINISHED, LOOK, Marker, done_dir, index_verdict, mark_done, parse_marker,
)
from beam_captions.io.listing import Found, ListingPlan, gcs_object_version, shard_for
from beam_captions.io.metas import finished_for, read_meta, same_version, version_meta
from beam_captions.io.paths import is_local, metas_dir
from beam_captions.metrics import count
from beam_captions.records import ClipRef, SourceVersion
from beam_captions.transforms.listing import SpreadListing, local_files

__all__ = ["INDEX_PLAN", "SkipFinishedClips", "source_version"]

# The index is listed 1,000 names a request; a worker lists 100 pages (100,000 clips) before it spreads
# the rest, so an output of up to that many clips costs exactly its pages.
INDEX_PLAN = ListingPlan(pages_per_shard=100, levels=2)


def source_version(source: str) -> Optional[SourceVersion]:
    """The version of ``source`` (``records.SourceVersion``: on gs:// with its generation), or ``None`` if
    it cannot be read."""
    try:
        if source.startswith("gs://"):
            return gcs_object_version(source)
        found = FileSystems.get_filesystem(source).metadata(source)
    except Exception:  # noqa: BLE001 - missing: decoding will say so
        return None
    return int(found.size_in_bytes), float(found.last_updated_in_seconds or 0.0)


class _Judge:
    """The decision for one clip of an output, shared by the batch and the streaming paths."""

    def __init__(self, output: str, asked: dict[str, Any], skip_existing: bool, retry_failed: bool):
        self.output, self.asked = output, dict(asked)
        self.skip_existing, self.retry_failed = skip_existing, retry_failed

    def finished(self) -> bool:
        """Whether a finished clip goes on: not (skipped), unless ``--no-skip-existing`` asks for it again."""
        if self.skip_existing:
            count("clips_skipped")
            return False
        count("clips_not_skipped")  # finished, redone because --no-skip-existing asks
        return True

    def closer_look(self, clip: ClipRef, metas_size: Optional[int] = None) -> bool:
        """Whether ``clip`` goes on, by its metas (read now). A finished clip the index did not know
        (``metas_size``: the listed size of its metas) gets its marker."""
        meta = read_meta(self.output, clip.clip_id)  # also without skip_existing: the summary says why it is redone
        if finished_for(meta, self.asked, clip.version, self.retry_failed):
            if metas_size is not None and clip.version is not None:
                mark_done(self.output, clip.clip_id, metas_size, meta["status"], version_meta(clip.version),
                          meta.get("outputs") or {}, replaces=True)
            return self.finished()
        if meta is not None:
            if not same_version(meta.get("source_version"), clip.version):
                count("clips_replaced")
            elif meta.get("status") == "failed":
                count("clips_retried")
            elif all(name in (meta.get("outputs") or {}) for name in self.asked):
                count("clips_other_settings")  # each asked output is there, one made differently
            else:
                count("clips_extended")  # an asked output is missing
        return True


def _stamped(clip: ClipRef) -> ClipRef:
    return clip if clip.version is not None else dataclasses.replace(clip, version=source_version(clip.source))


class _SkipEach(beam.DoFn):
    """Streaming: each clip's metas read as it comes."""

    def __init__(self, judge: _Judge):
        self.judge = judge

    def process(self, clip: ClipRef):
        clip = _stamped(clip)
        if self.judge.closer_look(clip):
            yield clip


class _SkipJoined(beam.DoFn):
    """Batch: each clip with what the index listing found of it (its metas' size, its markers)."""

    def __init__(self, judge: _Judge):
        self.judge = judge

    def process(self, joined: tuple[str, dict[str, Iterable[Any]]]):
        _, found = joined
        clips = list(found["clips"])
        if not clips:
            return
        sizes = [size for kind, size in found["index"] if kind == "metas"]
        markers = [marker for kind, marker in found["index"] if kind == "done"]
        metas_size = sizes[0] if sizes else None
        for clip in clips:
            clip = _stamped(clip)
            verdict = index_verdict(metas_size, markers, self.judge.asked, clip.version, self.judge.retry_failed)
            if verdict == FINISHED:
                if self.judge.finished():
                    yield clip
            elif verdict == LOOK:
                if self.judge.closer_look(clip, metas_size):
                    yield clip
            else:  # no metas: a clip never written (or whose metas is gone), nothing to read
                yield clip


def _index_entry(found: Found) -> Optional[tuple[str, tuple[str, Union[int, Marker]]]]:
    """``(clip id, ("metas", size))`` for a metas, ``(clip id, ("done", marker))`` for a marker."""
    name = posixpath.basename(found.path.replace("\\", "/"))
    if posixpath.basename(posixpath.dirname(found.path.replace("\\", "/"))) == "metas":
        if name.endswith(".json") and not name.startswith(".") and found.version is not None:
            return name[: -len(".json")], ("metas", int(found.version[0]))
        return None
    marker = parse_marker(name)
    return (marker.clip_id, ("done", marker)) if marker else None


def _start_index(folder: str):
    """The files of a local index folder (``Found``), or the first ``Shard`` of a gs:// one (no annotation:
    Beam would take it for the element type of what follows)."""
    if is_local(folder):
        yield from local_files(folder)
    elif folder.startswith("gs://"):
        yield shard_for(folder.rstrip("/") + "/")
    else:
        from beam_captions.io.files import matching

        for metadata in matching(FileSystems.join(folder, "*")):
            yield Found(metadata.path, (int(metadata.size_in_bytes), 0.0))


class SkipFinishedClips(beam.PTransform):
    """Stamp ``ClipRef``s with their source's version and (``skip_existing``) drop those whose metas
    says they are done for every output ``asked``, from the same source version: failed clips are
    tried again unless ``retry_failed`` is off, replaced files and clips missing an asked output are redone.

    Bounded input: decided by one listing of the output's metas and done index (``io.done_index``),
    reading a metas only where the index says to look closer."""

    def __init__(self, output: str, asked: Optional[dict[str, Any]] = None, skip_existing: bool = True,
                 retry_failed: bool = True):
        super().__init__()
        self.output = output
        self.asked = dict(asked or {})
        self.skip_existing, self.retry_failed = skip_existing, retry_failed

    def expand(self, clips):
        judge = _Judge(self.output, self.asked, self.skip_existing, self.retry_failed)
        if not clips.is_bounded:
            return clips | "Unfinished" >> beam.ParDo(_SkipEach(judge))
        index = (
            clips.pipeline
            | "IndexFolders" >> beam.Create([metas_dir(self.output), done_dir(self.output)])
            | "StartIndex" >> beam.FlatMap(_start_index)
        )
        if self.output.startswith("gs://"):  # only gs:// is listed in shards
            index = index | "ListIndex" >> SpreadListing(INDEX_PLAN)
        index = (
            index
            | "IndexEntries" >> beam.Map(_index_entry)
            | "Known" >> beam.Filter(lambda entry: entry is not None)
        )
        keyed = clips | "ById" >> beam.Map(lambda clip: (clip.clip_id, clip))
        return (
            {"clips": keyed, "index": index}
            | "Join" >> beam.CoGroupByKey()
            | "Unfinished" >> beam.ParDo(_SkipJoined(judge))
        )
