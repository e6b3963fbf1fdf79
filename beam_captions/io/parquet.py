"""The Parquet table of captions: one row per caption window, with a fixed schema."""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from beam_captions.quality import CaptionCheck
from beam_captions.records import WindowRecord

__all__ = ["CAPTION_KINDS", "CAPTION_SCHEMA", "caption_row", "check_columns", "parquet_bytes"]

CAPTION_KINDS = ("caption", "caption_stage2", "enhanced_caption")

CAPTION_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("window_index", pa.int32()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("num_sampled_frames", pa.int32()),
        ("caption", pa.string()),
        ("caption_stage2", pa.string()),
        ("enhanced_caption", pa.string()),
        ("caption_model", pa.string()),
        ("enhance_model", pa.string()),
        ("prompt_variant", pa.string()),
        ("preview", pa.string()),
        ("caption_retried", pa.bool_()),
        ("caption_prompt_tokens", pa.int32()),
    ]
    + [
        column
        for kind in CAPTION_KINDS
        for column in (
            (f"{kind}_num_tokens", pa.int32()),
            (f"{kind}_finish_reason", pa.string()),
            (f"{kind}_flags", pa.list_(pa.string())),
            (f"{kind}_sound", pa.bool_()),
        )
    ]
)


def check_columns(kind: str, check: Optional[CaptionCheck]) -> dict[str, Any]:
    """Token count, finish reason, flags and soundness of one caption kind (nulls when it was not made)."""
    return {
        f"{kind}_num_tokens": check.num_tokens if check else None,
        f"{kind}_finish_reason": check.finish_reason if check else None,
        f"{kind}_flags": list(check.flags) if check else None,
        f"{kind}_sound": check.sound if check else None,
    }


def caption_row(record: WindowRecord) -> dict[str, Any]:
    """The Parquet row of a window."""
    row = {
        "clip_id": record.clip_id,
        "source": record.source,
        "window_index": record.window_index,
        "start_frame": record.start_frame,
        "end_frame": record.end_frame,
        "start_s": record.start_s,
        "end_s": record.end_s,
        "num_sampled_frames": record.num_sampled_frames,
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
        row.update(check_columns(kind, check))
    return row


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    """``rows`` as one Parquet file with the caption schema (same rows, same bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()
