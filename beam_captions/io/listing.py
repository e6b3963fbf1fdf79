"""Listing gs:// prefixes in shards that several workers can list at once, each object with its version.

A *shard* is every object whose name starts with a prefix. A worker lists up to ``pages_per_shard`` pages of
its shard; where more remain it hands the rest on as new shards, one per next character that exists
after the last name listed (found with one-object "seek" requests, ``start_offset``): ``clip_0099`` with
``clip_1...`` to ``clip_9...`` behind it gives the shards ``clip_01`` ... ``clip_09`` and ``clip_1`` ...
``clip_9``. A small prefix is one list request; a large one spreads out after ``pages_per_shard`` pages.

Each object comes with its version (``Found.version``), so that no clip costs a request of its own:
``(size, created, generation)`` on gs://, where ``created`` is when the generation was written (its
bytes: a change of metadata alone changes the object's ``updated``, never its generation or this).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, NamedTuple, Optional, Union

from beam_captions.records import SourceVersion

__all__ = ["Found", "ListingPlan", "Shard", "blob_version", "gcs_object_version", "list_shard", "shard_for"]

_LIST_FIELDS = "items(name,size,generation,timeCreated),nextPageToken"
_MAX_CODE_POINT = 0x10FFFF


class Found(NamedTuple):
    """One object a listing found: its URI and version (``None`` where the listing could not tell)."""

    path: str
    version: Optional[SourceVersion]


@dataclasses.dataclass(frozen=True)
class ListingPlan:
    """How a listing spreads: objects per request (GCS's most is 1,000), pages a worker lists before it
    hands the rest of its shard on, and how many times a shard may be split (the last level lists on to
    the end of its shard)."""

    page_size: int = 1000
    pages_per_shard: int = 10
    levels: int = 3


@dataclasses.dataclass(frozen=True)
class Shard:
    """The objects of ``bucket`` whose names start with ``prefix``; ``pattern`` (a regular expression on the gs:// URI, a glob's) keeps only those it matches."""

    bucket: str
    prefix: str
    pattern: Optional[str] = None
    level: int = 0


def _seconds(moment) -> float:
    """A GCS timestamp in seconds since the epoch, converted as Beam's gcsio converts ``updated`` (so a
    version recorded by an older release compares with it exactly)."""
    from apache_beam.io.gcp.gcsio import GcsIO

    return float(GcsIO._updated_to_seconds(moment))


def blob_version(blob) -> SourceVersion:
    """``(size, created, generation)`` of a listed or reloaded google-cloud-storage blob."""
    return int(blob.size), _seconds(blob.time_created), int(blob.generation)


def _client():
    from beam_captions.io.conditional import _gcs_client

    return _gcs_client()


def gcs_object_version(path: str) -> Optional[SourceVersion]:
    """The version of one gs:// object (one request), ``None`` when there is none."""
    from apache_beam.io.gcp.gcsio import parse_gcs_path
    from google.api_core import exceptions

    bucket, name = parse_gcs_path(path)
    blob = _client().bucket(bucket).blob(name)
    try:
        blob.reload()
    except exceptions.NotFound:
        return None
    return blob_version(blob)


def shard_for(location: str, glob_pattern: Optional[str] = None) -> Shard:
    """The first shard of a gs:// prefix (everything under it), or of a glob (``glob_pattern``: the names
    under the glob's part before its first ``*``, ``?`` or ``[`` that the glob matches)."""
    from apache_beam.io.filesystem import FileSystem
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    bucket, prefix = parse_gcs_path(location, object_optional=True)
    pattern = None
    if glob_pattern is not None:
        bucket, prefix = parse_gcs_path(re.match(r"^[^[*?]*", glob_pattern).group(0), object_optional=True)
        pattern = FileSystem.translate_pattern(glob_pattern)
    return Shard(bucket, prefix, pattern=pattern)


def _successor(prefix: str) -> Optional[str]:
    """The least name greater than every name starting with ``prefix`` (``None``: there is none)."""
    code = ord(prefix[-1]) + 1
    if 0xD800 <= code <= 0xDFFF:  # surrogates are no characters of a name
        code = 0xE000
    return None if code > _MAX_CODE_POINT else prefix[:-1] + chr(code)


def _first_name_from(bucket: str, prefix: str, offset: str, skip: Optional[str] = None) -> Optional[str]:
    """The least name under ``prefix`` that is >= ``offset`` (and is not ``skip``): one small request."""
    blobs = _client().list_blobs(bucket, prefix=prefix, start_offset=offset, max_results=2 if skip else 1,
                                 fields="items(name),nextPageToken")
    return next((blob.name for blob in blobs if blob.name != skip), None)


def _rest(shard: Shard, last: str) -> Iterator[Shard]:
    """Shards that cover every name of ``shard`` greater than ``last``: one per name prefix that ends one
    character past where such a name first differs from ``last`` (each found by one seek)."""
    name = _first_name_from(shard.bucket, shard.prefix, last, skip=last)
    while name is not None:
        common = 0
        while common < len(last) and name[common] == last[common]:
            common += 1
        child = name[:common + 1]
        yield Shard(shard.bucket, child, pattern=shard.pattern, level=shard.level + 1)
        offset = _successor(child)
        if offset is None or not offset.startswith(shard.prefix):
            return
        name = _first_name_from(shard.bucket, shard.prefix, offset)


def list_shard(shard: Shard, plan: ListingPlan = ListingPlan()) -> Iterator[Union[Found, Shard]]:
    """The objects of ``shard`` (``Found``), and where it is larger than one worker should list (more
    than ``plan.pages_per_shard`` pages, below the last level), the shards that hold the rest."""
    matcher = re.compile(shard.pattern).match if shard.pattern else None
    blobs = _client().list_blobs(shard.bucket, prefix=shard.prefix, page_size=plan.page_size, fields=_LIST_FIELDS)
    last = None
    for number, page in enumerate(blobs.pages, start=1):
        for blob in page:
            last = blob.name
            path = f"gs://{shard.bucket}/{blob.name}"
            if matcher is None or matcher(path):
                yield Found(path, blob_version(blob))
        if number >= plan.pages_per_shard and shard.level < plan.levels and blobs.next_page_token and last:
            yield from _rest(shard, last)
            return
