"""The per-clip metadata document (``OUT/metas/<clip_id>.json``)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from beam_captions.io.parquet import check_columns
from beam_captions.records import ClipInfo, Failure, WindowRecord

__all__ = ["META_VERSION", "clip_meta", "window_meta", "failure_meta"]

META_VERSION = 1


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
    clip_id: str, source: str, info: Optional[ClipInfo], windows: Iterable[WindowRecord], failures: Iterable[Failure]
) -> dict[str, Any]:
    """Everything known about one clip; video facts are null when the clip could not be decoded."""
    return {
        "version": META_VERSION,
        "clip_id": clip_id,
        "source": source,
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
        "windows": [window_meta(w) for w in sorted(windows, key=lambda w: w.window_index)],
        "errors": [
            failure_meta(f)
            for f in sorted(failures, key=lambda f: (f.window_index is not None, f.window_index or 0, f.stage))
        ],
    }
