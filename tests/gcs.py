"""A real GCS-protocol server on loopback for tests: gcp-storage-emulator, in memory, in this process.

``storage_emulator("in-bucket", "out-bucket")`` starts one on a free port, points every storage client
at it (``STORAGE_EMULATOR_HOST``) and stops Beam from looking for Google credentials, which offline
costs about 24 s of retries per process (``--no_auth`` does not prevent it: in Beam 2.77 and 2.78 only the
Dataflow runner reads that option, ``gcsio`` never does). Test modules use the ``gcs`` fixture::

    from gcs import gcs  # noqa: F401  (the module-scoped fixture)

    def test_x(gcs):
        gcs.upload_file("/tmp/a.mp4", "gs://in-bucket/raw/a.mp4")

Generation preconditions (``ifGenerationMatch`` on uploads, reads and deletes), listing pages of at most
1,000 names with ``startOffset`` / ``endOffset``, and a patch of metadata moving ``updated`` are as GCS has
them: the emulator alone ignores the first two and leaves ``updated`` on a patch.

A child process gets the emulator's address through the environment and calls ``anonymous_beam()``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

__all__ = ["REQUESTS", "Emulator", "anonymous_beam", "gcs", "split_uri", "storage_emulator"]


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/name`` -> (``bucket``, ``some/name``)."""
    assert uri.startswith("gs://"), uri
    bucket, _, name = uri[len("gs://"):].partition("/")
    return bucket, name


def anonymous_beam(patch: Optional[pytest.MonkeyPatch] = None) -> None:
    """Beam's GCS client connects anonymously at once instead of searching for credentials."""
    from apache_beam.internal.gcp import auth

    def no_credentials(pipeline_options: Any) -> None:
        return None

    if patch is None:
        auth.get_service_credentials = no_credentials
    else:
        patch.setattr(auth, "get_service_credentials", no_credentials)


class Emulator:
    """A running emulator and a google-cloud-storage client talking to it."""

    def __init__(self, host: str, server: Any):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.host = host
        self.server = server
        self.client = storage.Client(project="test", credentials=AnonymousCredentials())

    def create_bucket(self, name: str) -> str:
        self.client.create_bucket(name)
        return f"gs://{name}"

    def upload_bytes(self, data: bytes, uri: str) -> None:
        bucket, name = split_uri(uri)
        self.client.bucket(bucket).blob(name).upload_from_string(data)

    def upload_file(self, path: str, uri: str) -> None:
        self.upload_bytes(Path(path).read_bytes(), uri)

    def upload_dir(self, directory: str, prefix: str) -> list[str]:
        """Every file under ``directory`` to ``prefix/<relative path>``; returns the relative paths."""
        relative = sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file())
        for name in relative:
            self.upload_file(os.path.join(directory, name), f"{prefix.rstrip('/')}/{name}")
        return relative

    def list(self, prefix: str) -> list[str]:
        """The gs:// URIs of every object under ``prefix``, sorted."""
        bucket, name = split_uri(prefix)
        return sorted(f"gs://{bucket}/{blob.name}" for blob in self.client.list_blobs(bucket, prefix=name))

    def read(self, uri: str) -> bytes:
        bucket, name = split_uri(uri)
        return self.client.bucket(bucket).blob(name).download_as_bytes()

    def exists(self, uri: str) -> bool:
        bucket, name = split_uri(uri)
        return self.client.bucket(bucket).blob(name).exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _object_name(request) -> Optional[str]:
    """The object a JSON-API upload or object request is about."""
    if request.params.get("object_id"):
        return request.params["object_id"]
    if request.query.get("name"):
        return request.query["name"][0]
    data = request.data
    if not isinstance(data, dict):
        return None
    return data.get("meta", {}).get("name") or data.get("name")  # a multipart upload, or a resumable one's start


def _honouring_preconditions(handler):
    """``handler`` answering 412 when ``ifGenerationMatch`` names another generation than the object's
    (0: the object must not exist), as GCS does; the emulator itself ignores the parameter."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound

    def checked(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        name = _object_name(request) if wanted else None
        if wanted and name is not None:
            try:
                generation = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
            except NotFound:
                generation = "0"
            if generation != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        return handler(request, response, storage, *args, **kwargs)

    return checked


def _listing_in_pages(request, response, storage, *args, **kwargs):
    """``objects.list`` as GCS answers it: ``startOffset`` / ``endOffset`` honoured, and at most
    ``maxResults`` (1,000 at most and by default) names a page, the rest behind a ``nextPageToken``. The
    emulator alone ignores the offsets and gives every object in one answer."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import BadRequest, NotFound

    def first(key: str) -> Optional[str]:
        return request.query[key][0] if request.query.get(key) else None

    try:
        items, prefixes = storage.get_file_list(request.params["bucket_name"], first("prefix"), first("delimiter"),
                                                first("matchGlob"))
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    except BadRequest:
        response.status = HTTPStatus.BAD_REQUEST
        return
    lowest = max(filter(None, (first("startOffset"), first("pageToken"))), default=None)
    end = first("endOffset")
    items = [item for item in items
             if (lowest is None or item["name"] >= lowest) and (end is None or item["name"] < end)]
    size = min(int(first("maxResults") or 1000), 1000)
    body = {"kind": "storage#objects", "prefixes": [] if first("pageToken") else prefixes, "items": items[:size]}
    if len(items) > size:
        body["nextPageToken"] = items[size]["name"]
    response.json(body)


def _patch_updates_the_time(handler):
    """``handler`` (``objects.patch``) that also sets the object's ``updated``, as GCS does on any change
    of metadata (its generation stays: the bytes are the same). The emulator alone leaves ``updated``."""
    from datetime import datetime, timezone

    from gcp_storage_emulator.exceptions import NotFound

    def patched(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        try:
            obj = storage.get_file_obj(bucket, name)
        except NotFound:
            return
        obj["updated"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        storage.patch_object(bucket, name, obj)
        response.json(obj)

    return patched


REQUESTS: list[tuple[str, str]] = []  # (kind, object name or list prefix) of every request served, in order
_KINDS = {"ls": "list", "get": "get", "download": "download", "insert": "upload", "xml_upload": "upload",
          "upload_partial": "upload", "delete": "delete", "patch": "patch"}


def _kind(handler) -> str:
    """``list``, ``get`` (an object's metadata), ``download``, ``upload``, ``delete``, ``patch``; else the
    handler's module and name (``buckets.get``)."""
    if handler.__module__.endswith(".objects") and handler.__name__ in _KINDS:
        return _KINDS[handler.__name__]
    return f"{handler.__module__.rsplit('.', 1)[-1]}.{handler.__name__}"


def _recorded(handler, kind: str):
    """``handler`` that first notes the request in ``REQUESTS``."""

    def recording(request, response, storage, *args, **kwargs):
        name = request.query["prefix"][0] if kind == "list" and request.query.get("prefix") else _object_name(request)
        if not name and request.query.get("upload_id"):  # a resumable upload's data: the object it started
            try:
                name = storage.get_resumable_file_obj(request.query["upload_id"][0]).get("name")
            except Exception:  # noqa: BLE001 - an unknown upload: the handler answers it
                name = None
        REQUESTS.append((kind, name or ""))
        return handler(request, response, storage, *args, **kwargs)

    return recording


def _install_preconditions() -> None:
    """Generation preconditions, listing pages and offsets, and ``updated`` on a patch, as GCS has them."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_preconditions_installed", False):
        return
    guarded = {objects.insert, objects.delete, objects.get, objects.download}

    def as_gcs(handler):
        if handler is objects.ls:
            return _listing_in_pages
        if handler is objects.patch:
            return _patch_updates_the_time(handler)
        return _honouring_preconditions(handler) if handler in guarded else handler

    server.HANDLERS = tuple((regex, {method: _recorded(as_gcs(h), _kind(h))
                                     for method, h in handlers.items()})
                            for regex, handlers in server.HANDLERS)
    server._preconditions_installed = True


@contextlib.contextmanager
def storage_emulator(*buckets: str) -> Iterator[Emulator]:
    """An in-memory emulator holding ``buckets``; the environment points at it until the block ends."""
    from gcp_storage_emulator.server import create_server

    _install_preconditions()
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            anonymous_beam(patch)
            emulator = Emulator(f"http://127.0.0.1:{port}", server)
            for bucket in buckets:
                emulator.create_bucket(bucket)
            yield emulator
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gcs() -> Iterator[Emulator]:
    """An emulator (no buckets yet) for the whole test module."""
    with storage_emulator() as emulator:
        yield emulator
