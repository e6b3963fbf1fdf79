"""The per-clip metadata document (``OUT/metas/<clip_id>.json``)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from beam_captions.io.conditional import read_with_token
from beam_captions.io.files import parse_json_object, read_json_or_none
from beam_captions.io.parquet import CAPTION_KINDS, check_columns
from beam_captions.io.paths import meta_path
from beam_captions.records import ClipInfo, Failure, SourceVersion, WindowRecord

__all__ = [
    "META_VERSION", "CAPTION_GROUP", "PREVIEW_GROUP", "clip_meta", "window_meta", "failure_meta", "version_meta",
    "same_version",
    "finished_for", "merge_windows", "read_meta", "read_meta_with_token",
]

META_VERSION = 2

# The window fields each kind of output fills. ``captions`` covers stage 2 and enhancement, which derive
# from the stage-1 caption: a run that captions replaces the whole group; a run that does not keeps it.
CAPTION_GROUP: tuple[str, ...] = (
    "caption", "caption_stage2", "enhanced_caption", "caption_model", "enhance_model", "prompt_variant",
    "caption_retried", "caption_prompt_tokens",
    *(f"{kind}_{suffix}" for kind in CAPTION_KINDS for suffix in ("num_tokens", "finish_reason", "flags", "sound")),
)
PREVIEW_GROUP: tuple[str, ...] = ("preview",)
CAPTION_OUTPUTS = ("captions", "stage2", "enhancement")  # the ``outputs`` keys of the caption group


def version_meta(version: Optional[SourceVersion]) -> Optional[dict[str, Any]]:
    """The source's version as recorded in metas: its size and last-modified time (s since the epoch);
    on gs:// also its generation, ``modified`` then being when that generation was written."""
    if version is None:
        return None
    size, modified, *generation = version
    recorded = {"size": int(size), "modified": float(modified)}
    if generation:
        recorded["generation"] = int(generation[0])
    return recorded


# An older release recorded a gs:// object's ``updated`` time (Beam's conversion, to the microsecond): the
# object's bytes are those it saw when their generation was written no later than that.
_UPDATED_SLACK_S = 1e-3


def same_version(recorded: Any, version: Optional[SourceVersion]) -> bool:
    """Whether the ``source_version`` a metas records is ``version`` (a listed one). ``version`` unknown
    (``None``) matches anything; nothing recorded matches no known version.

    gs:// (``version`` has a generation): the same size and generation. A metas of an older release,
    which recorded ``(size, updated)`` and no generation, matches when the size is the same and the
    object's generation was written no later than that ``updated``: the same bytes, whatever metadata
    changed since; a new upload is a new generation, written after it. Elsewhere: size and modification
    time, exactly.
    """
    if version is None:
        return True
    if not isinstance(recorded, dict) or recorded.get("size") != int(version[0]):
        return False
    if len(version) > 2 and "generation" in recorded:
        return recorded["generation"] == int(version[2])
    if len(version) > 2:
        modified = recorded.get("modified")
        return isinstance(modified, (int, float)) and float(version[1]) <= modified + _UPDATED_SLACK_S
    return recorded.get("modified") == float(version[1]) and "generation" not in recorded


def finished_for(meta: Any, asked: dict[str, Any], version: Optional[SourceVersion], retry_failed: bool) -> bool:
    """Whether the clip of ``meta`` needs nothing from a run that makes ``asked`` (its ``outputs``).

    It does when: the metas is from before statuses (version 1), the source changed (``same_version``),
    it lacks an asked output or has one made differently (model, prompt, settings), or it failed and
    ``retry_failed``. A failed clip kept by ``--no-retry-failed`` counts as finished whatever it has.
    """
    if not isinstance(meta, dict) or meta.get("status") not in ("done", "failed"):
        return False
    if not same_version(meta.get("source_version"), version):
        return False
    if meta["status"] == "failed":
        return not retry_failed
    have = meta.get("outputs") or {}
    return all(have.get(name) == made_by for name, made_by in asked.items())


def merge_windows(
    new: list[dict[str, Any]], old: Optional[dict[str, Any]], asked: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """This run's window metas completed with what ``old`` (the clip's metas of the same source
    version) has and this run did not make; and the outputs the result has.

    A window keeps an old field group (previews, or captions with stage 2 and enhancement) only where
    the old window spans the same frames; ``old`` from another source version is never mixed in.
    """
    outputs = dict(asked)
    if not old:
        return new, outputs
    old_windows = {(w.get("window_index"), w.get("start_frame"), w.get("end_frame")): w for w in old.get("windows") or []}
    old_outputs = old.get("outputs") or {}
    groups = []
    if "previews" not in asked and "previews" in old_outputs:
        groups.append(PREVIEW_GROUP)
        outputs["previews"] = old_outputs["previews"]
    if "captions" not in asked and "captions" in old_outputs:
        groups.append(CAPTION_GROUP)
        outputs.update({name: old_outputs[name] for name in CAPTION_OUTPUTS if name in old_outputs})
    merged = []
    for window in new:
        before = old_windows.get((window["window_index"], window["start_frame"], window["end_frame"]))
        if before is not None:
            window = {**window, **{key: before.get(key) for group in groups for key in group}}
        merged.append(window)
    return merged, outputs


def window_meta(record: WindowRecord) -> dict[str, Any]:
    document = {
        "window_index": record.window_index,
        "start_frame": record.start_frame,
        "end_frame": record.end_frame,
        "start_s": round(record.start_s, 6),
        "end_s": round(record.end_s, 6),
        "sampled_frames": list(record.frame_indices),
        "caption": record.caption,
        "caption_stage2": record.caption_stage2,
        "enhanced_caption": record.enhanced_caption,
        "caption_model": record.caption_model,
        "enhance_model": record.enhance_model,
        "prompt_variant": record.prompt_variant,
        "preview": record.preview_uri,
        "caption_retried": record.caption_retried,
        "caption_prompt_tokens": record.caption_prompt_tokens,
    }
    for kind, check in record.checks().items():
        document.update(check_columns(kind, check))
    return document


def failure_meta(failure: Failure) -> dict[str, Any]:
    return {
        "source": failure.source,
        "clip_id": failure.clip_id,
        "stage": failure.stage,
        "error_type": failure.error_type,
        "message": failure.message,
        "window_index": failure.window_index,
    }


def clip_meta(
    clip_id: str,
    source: str,
    info: Optional[ClipInfo],
    windows: Iterable[dict[str, Any]],
    failures: Iterable[Failure],
    *,
    source_version: Optional[SourceVersion] = None,
    outputs: Optional[dict[str, Any]] = None,
    captions_file: Optional[str] = None,
) -> dict[str, Any]:
    """Everything known about one clip (``windows``: window metas); video facts are null when the clip
    could not be decoded. ``status`` is ``done`` without failures, else ``failed``."""
    failures = list(failures)
    return {
        "version": META_VERSION,
        "clip_id": clip_id,
        "source": source,
        "status": "failed" if failures or info is None else "done",
        "source_version": version_meta(source_version),
        "outputs": dict(outputs or {}),
        "captions_file": captions_file,
        "width": info.width if info else None,
        "height": info.height if info else None,
        "display_width": (info.display_width or info.width) if info else None,
        "display_height": (info.display_height or info.height) if info else None,
        "rotation": info.rotation if info else None,
        "fps": info.fps if info else None,
        "num_frames": info.num_frames if info else None,
        "codec": info.codec if info else None,
        "duration_s": info.duration_s if info else None,
        "warnings": list(info.warnings) if info else [],
        # frames that gave no picture (damaged or cut streams): their count, and where when the timestamps tell
        "lost_frames": info.lost_frames if info else None,
        "lost_frame_ranges": [list(span) for span in info.lost_frame_ranges] if info else [],
        "windows": sorted(windows, key=lambda w: w["window_index"]),
        "errors": [
            failure_meta(f)
            for f in sorted(failures, key=lambda f: (f.window_index is not None, f.window_index or 0, f.stage))
        ],
    }


def read_meta(output: str, clip_id: str) -> Optional[dict[str, Any]]:
    """The clip's metas under ``output``, or ``None`` when there is none (or it cannot be read: the clip
    then counts as not done, and its next write replaces the file)."""
    return read_json_or_none(meta_path(output, clip_id))


def read_meta_with_token(output: str, clip_id: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The clip's metas and the token of the version read (``io.conditional``): a change made on the
    strength of it can be made only if nobody wrote the metas since."""
    data, token = read_with_token(meta_path(output, clip_id))
    return parse_json_object(data), token
