"""Bucket notifications (Cloud Storage -> Pub/Sub) as clips to caption."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import apache_beam as beam

from beam_captions.metrics import count
from beam_captions.records import ClipRef
from beam_captions.transforms.read import is_video_path

__all__ = ["clip_uri_from_notification", "ClipsFromNotifications"]

FINALIZE = "OBJECT_FINALIZE"


def clip_uri_from_notification(attributes: Mapping[str, str], data: bytes) -> tuple[Optional[str], str]:
    """The gs:// URI of a newly written video, or ``None`` and the reason it is ignored.

    Cloud Storage puts ``eventType``, ``bucketId`` and ``objectId`` in the message attributes;
    the JSON payload (object metadata) is used when attributes are missing.
    """
    event = attributes.get("eventType", "")
    if event != FINALIZE:
        return None, f"event_{event.lower() or 'unknown'}"
    bucket, name = attributes.get("bucketId"), attributes.get("objectId")
    if not (bucket and name):
        try:
            payload: Any = json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, "unreadable"
        bucket, name = payload.get("bucket"), payload.get("name")
    if not (bucket and name):
        return None, "unreadable"
    if not is_video_path(name):
        return None, "not_video"
    return f"gs://{bucket}/{name}", "clip"


def _to_clip(message, timestamp=beam.DoFn.TimestampParam) -> list[ClipRef]:
    uri, reason = clip_uri_from_notification(message.attributes or {}, message.data)
    if uri is None:
        count(f"notifications_ignored_{reason}")
        return []
    count("clips_found")
    return [ClipRef.from_source(uri, float(timestamp))]


class ClipsFromNotifications(beam.PTransform):
    """``ClipRef``s of video objects finalized in a bucket, from its Pub/Sub notification subscription.

    Other events (delete, metadata update, archive) and non-video objects are counted and dropped.
    """

    def __init__(self, subscription: str):
        super().__init__()
        self.subscription = subscription

    def expand(self, pbegin):
        return (
            pbegin
            | "ReadNotifications" >> beam.io.ReadFromPubSub(subscription=self.subscription, with_attributes=True)
            | "ToClipRef" >> beam.FlatMap(_to_clip)
        )
