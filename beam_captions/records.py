"""Plain, picklable records that flow between the pipeline's transforms.

One PCollection carries three kinds of element: ``ClipInfo`` (one per decoded
clip), ``WindowRecord`` (one per caption window, filled in stage by stage, carrying
the failures of its stages) and ``Failure`` (one per clip that could not be decoded). Each transform works on the kind it
knows and passes the others through, so the stages chain with ``|``.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from beam_captions.quality import CaptionCheck

__all__ = ["ClipRef", "ClipInfo", "SourceVersion", "WindowRecord", "Failure", "clip_id_for", "failure_from_exception"]

# A source's version: ``(size in bytes, modified s since the epoch)`` on a local disk (and other filesystems);
# ``(size, created, generation)`` on gs://, ``created`` being when that generation (those bytes) was written.
SourceVersion = Union[tuple[int, float], tuple[int, float, int]]


def clip_id_for(source: str) -> str:
    """Stable id of a clip: a UUID5 of its source URI."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, source))


@dataclass(frozen=True)
class ClipRef:
    """A clip to process: where it is and its id."""

    source: str
    clip_id: str
    found_at: Optional[float] = None  # event time (s since the epoch) a streaming source saw the clip
    version: Optional[SourceVersion] = None  # of the source when listed

    @classmethod
    def from_source(cls, source: str, found_at: Optional[float] = None) -> "ClipRef":
        return cls(source=source, clip_id=clip_id_for(source), found_at=found_at)


@dataclass(frozen=True)
class ClipInfo:
    """What the decode pass learnt about a clip."""

    clip_id: str
    source: str
    width: int
    height: int
    fps: float
    num_frames: int
    codec: str
    duration_s: float
    num_windows: int
    warnings: tuple[str, ...] = ()
    found_at: Optional[float] = None
    source_version: Optional[SourceVersion] = None  # the ``ClipRef.version`` that was decoded
    display_width: Optional[int] = None  # as shown (sample aspect ratio and rotation applied)
    display_height: Optional[int] = None
    rotation: int = 0  # the display rotation applied, as a ``rotate`` tag gives it
    lost_frames: int = 0  # frames demuxed that gave no picture
    lost_frame_ranges: tuple[tuple[int, int], ...] = ()  # those frames, (first, last) source frame indices


@dataclass(frozen=True)
class WindowRecord:
    """One caption window; each stage fills its fields and drops the frames it consumed."""

    clip_id: str
    source: str
    window_index: int
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    frame_indices: tuple[int, ...]
    frames: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    preview_frames: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    preview_fps: Optional[float] = None
    preview_webp: Optional[bytes] = field(default=None, repr=False)
    preview_uri: Optional[str] = None
    caption: Optional[str] = None
    caption_stage2: Optional[str] = None
    enhanced_caption: Optional[str] = None
    caption_check: Optional[CaptionCheck] = None
    caption_stage2_check: Optional[CaptionCheck] = None
    enhanced_caption_check: Optional[CaptionCheck] = None
    caption_retried: bool = False
    caption_prompt_tokens: Optional[int] = None  # tokens the captioner took in for stage 1, video included
    caption_model: Optional[str] = None
    enhance_model: Optional[str] = None
    prompt_variant: Optional[str] = None
    prompt: Optional[str] = field(default=None, repr=False)  # caption prompt chosen in preparation (PrepareWindows)
    source_version: Optional[SourceVersion] = None  # the ``ClipRef.version`` that was decoded
    failures: tuple["Failure", ...] = ()  # what went wrong for this window, stage by stage: its outcome travels whole

    @property
    def num_sampled_frames(self) -> int:
        return len(self.frame_indices)

    def checks(self) -> dict[str, Optional[CaptionCheck]]:
        """The sanity check of each caption kind, by column name."""
        return {
            "caption": self.caption_check,
            "caption_stage2": self.caption_stage2_check,
            "enhanced_caption": self.enhanced_caption_check,
        }

    def replace(self, **changes) -> "WindowRecord":
        return dataclasses.replace(self, **changes)

    def with_failure(self, failure: "Failure") -> "WindowRecord":
        """This window with ``failure`` added to its outcome (stamped with the window's source version)."""
        if failure.source_version is None and self.source_version is not None:
            failure = failure.replace(source_version=self.source_version)
        return self.replace(failures=(*self.failures, failure))


@dataclass(frozen=True)
class Failure:
    """A clip or window that did not make it through a stage, and why."""

    source: str
    clip_id: str
    stage: str
    error_type: str
    message: str
    window_index: Optional[int] = None
    windows_before: int = 0  # windows a clip had already given when its ``prepare`` step failed
    found_at: Optional[float] = None  # the clip's event time, on ``prepare`` failures (streaming)
    source_version: Optional[SourceVersion] = None  # the source version it failed on

    def replace(self, **changes) -> "Failure":
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        """A file name derived from ids only."""
        where = "clip" if self.window_index is None else f"w{self.window_index:05d}"
        return f"{self.clip_id}_{where}_{self.stage}"


def failure_from_exception(
    error: BaseException, *, source: str, clip_id: str, stage: str, window_index: Optional[int] = None,
    source_version: Optional[SourceVersion] = None,
) -> Failure:
    """A failure record for ``error``, with a one-line message."""
    message = " ".join(str(error).split()) or repr(error)
    return Failure(source, clip_id, stage, type(error).__name__, message[:2000], window_index,
                   source_version=source_version)
