"""Where a model's weights come from: a local directory, an object-store prefix, or the Hugging Face hub.

``resolve_model_dir`` turns what ``--model-dir`` names into a local directory vLLM can load:

* a local directory with weights is used as it is;
* a ``gs://`` (or any other Beam file system) prefix is copied once per machine into a local cache,
  under an inter-process file lock, so parallel workers copy it once;
* a local directory without weights (or one that does not exist yet) is filled from the hub with the
  pinned revision, once per machine, under the same kind of lock. Offline, or when the download fails,
  ``ModelUnavailableError`` says in one line how to fetch the weights by hand.

``check_model_source`` is the cheap check the command line runs before any work starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

__all__ = [
    "PINNED_REVISIONS",
    "ModelUnavailableError",
    "cache_root",
    "check_model_source",
    "has_weights",
    "pinned_revision",
    "resolve_model_dir",
]

log = logging.getLogger(__name__)

# Commits of the checkpoints in ``variants.CAPTION_MODELS`` / ``variants.ENHANCE_MODELS``: a download
# always gets these exact files, whatever ``main`` points to later.
PINNED_REVISIONS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": "cc594898137f460bfe9f0759e9844b3ce807cfb5",
    "Qwen/Qwen3-VL-8B-Instruct": "0c351dd01ed87e9c1b53cbc748cba10e6187ff3b",
    "Qwen/Qwen2.5-14B-Instruct": "cf98f3b3bbb457ad9e2bb7baf9a0125b6b88caa8",
    "Qwen/Qwen3-14B": "40c069824f4251a91eefaf281ebe4c544efd3e18",
    # NVIDIA's own pins of these checkpoints (its public registry of pinned hub revisions); not
    # checked against the hub from here (no hub access where this was written).
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16": "5d250e2e111dc5e1434131bdf3d590c27a878ade",
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-FP8": "7394488badb786e1decc0e00e308de1cab9560e6",
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-NVFP4-QAD": "b8d3c170d9ee3a078917ef9bfd508eff988d6de7",
    "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16": "24e67ea000b7c2837fc8f9488aa2008524fac8ba",
}

CACHE_ENV = "BEAM_CAPTIONS_CACHE"
COMPLETE_MARKER = ".beam-captions-complete"
PROBE_TIMEOUT_S = 10.0  # the first request to the hub; offline it fails at once instead of retrying
COPY_THREADS = 8
_CHUNK = 16 << 20
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class ModelUnavailableError(RuntimeError):
    """The weights are not there and cannot be fetched; the message is one line and says how to fetch them."""


def pinned_revision(model_id: Optional[str]) -> str:
    """The commit a download of ``model_id`` gets (``main`` for a model this project does not pin)."""
    return PINNED_REVISIONS.get(model_id or "", "main")


def cache_root() -> str:
    """Where copies of object-store models go: ``$BEAM_CAPTIONS_CACHE`` or ``~/.cache/beam-captions/models``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "beam-captions", "models")


def has_weights(directory: str) -> bool:
    """``directory`` holds a loadable checkpoint: ``config.json`` and its weights (every shard of an index)."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return False
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as handle:
                    shards = set(json.load(handle)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return bool(shards) and all(os.path.isfile(os.path.join(directory, shard)) for shard in shards)
    return any(
        name.endswith((".safetensors", ".bin")) and os.path.isfile(os.path.join(directory, name))
        for name in os.listdir(directory)
    )


def _remote(uri: str) -> bool:
    match = _SCHEME.match(uri)
    return bool(match) and match.group(1).lower() != "file"


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "no details"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), held by one process (or thread) at a time.

    Lock files are never removed: removing one while another process waits on it would let a third take a
    fresh lock beside it.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s", path[: -len(".lock")])
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _lock_path(directory: str) -> str:
    """``<parent>/.<name>.lock``: next to the directory, never inside the copy that gets renamed."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(directory)))
    return os.path.join(parent, f".{name}.lock")


# ---------------------------------------------------------------- object stores


def _cache_dir_for(uri: str, cache_dir: Optional[str]) -> str:
    digest = hashlib.sha256(uri.rstrip("/").encode("utf-8")).hexdigest()[:32]
    return os.path.join(cache_dir or cache_root(), digest)


def _list_prefix(prefix: str) -> list[tuple[str, str, int]]:
    """(object path, path relative to ``prefix``, size) of every object under ``prefix``."""
    from apache_beam.io.filesystems import FileSystems

    base = prefix.rstrip("/") + "/"
    found = []
    for metadata in FileSystems.match([base + "**"])[0].metadata_list:
        relative = metadata.path[len(base):] if metadata.path.startswith(base) else ""
        if relative and not relative.endswith("/"):  # skip "folder" placeholder objects
            found.append((metadata.path, relative, metadata.size_in_bytes))
    return sorted(found, key=lambda item: item[1])


def _copy_object(source: str, target: str, size: int) -> None:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    os.makedirs(os.path.dirname(target), exist_ok=True)
    # UNCOMPRESSED: Beam would otherwise gunzip a file that ends in .gz.
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as reader, open(target, "wb") as out:
        shutil.copyfileobj(reader, out, _CHUNK)
    copied = os.path.getsize(target)
    if copied != size:
        raise OSError(f"copied {copied} of {size} bytes of {source}")


def _copy_tree(uri: str, target: str) -> tuple[int, int]:
    """Copy every object under ``uri`` into the directory ``target``; returns (files, bytes)."""
    objects = _list_prefix(uri)
    if not objects:
        raise ModelUnavailableError(f"{uri} is not a model directory (nothing is stored under it)")
    if "config.json" not in {relative for _, relative, _ in objects}:
        raise ModelUnavailableError(f"{uri} is not a model directory (no config.json under it)")
    with ThreadPoolExecutor(max_workers=min(COPY_THREADS, len(objects))) as pool:
        copies = [pool.submit(_copy_object, path, os.path.join(target, name), size) for path, name, size in objects]
        for copy in copies:
            copy.result()
    return len(objects), sum(size for _, _, size in objects)


def _copy_remote(uri: str, cache_dir: Optional[str]) -> str:
    """The local copy of the model under ``uri``, made now if this machine has none yet."""
    final = _cache_dir_for(uri, cache_dir)
    marker = os.path.join(final, COMPLETE_MARKER)
    if os.path.isfile(marker):
        return final
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(_lock_path(final)):
        if os.path.isfile(marker):  # another process copied it while this one waited
            return final
        for stale in glob.glob(os.path.join(parent, f".{name}.tmp-*")):  # left by a copy that died
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        temporary = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            try:
                files, size = _copy_tree(uri, temporary)
            except ModelUnavailableError:
                raise
            except Exception as error:  # no access, no network, a full disk
                raise ModelUnavailableError(f"cannot copy {uri} to {parent} ({_one_line(error)})") from error
            if not has_weights(temporary):
                raise ModelUnavailableError(f"{uri} is not a model directory (config.json but no weights under it)")
            os.chmod(temporary, 0o755)  # mkdtemp makes it private
            with open(os.path.join(temporary, COMPLETE_MARKER), "w", encoding="utf-8") as handle:
                json.dump({"source": uri, "files": files, "bytes": size}, handle)  # written last
            if os.path.exists(final):  # an incomplete copy (no marker): replace it
                shutil.rmtree(final)
            os.rename(temporary, final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    log.info("copied %s (%d files, %.1f MB) to %s in %.1f s", uri, files, size / 1e6, final, time.monotonic() - started)
    return final


# ---------------------------------------------------------------- the hub


def _unavailable(directory: str, model_id: str, revision: str, reason: str, existed: bool = True) -> ModelUnavailableError:
    command = f"hf download {model_id} --revision {revision} --local-dir {shlex.quote(directory)}"
    what = "it holds no weights" if existed else "it does not exist"
    return ModelUnavailableError(
        f"{directory} is not a model directory ({what}) and {model_id} could not be downloaded "
        f"({reason}); fetch it with: {command}"
    )


def _first_missing(directory: str) -> Optional[str]:
    """The outermost folder of ``directory`` (itself included) that does not exist yet, or ``None``."""
    path, missing = os.path.normpath(os.path.abspath(directory)), None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _download(directory: str, model_id: Optional[str], revision: Optional[str]) -> str:
    """Fill ``directory`` with ``model_id`` at ``revision`` from the hub, once per machine."""
    if not model_id:
        raise ModelUnavailableError(
            f"{directory} is not a model directory (it holds no weights) and no Hugging Face model id is known for it"
        )
    revision = revision or pinned_revision(model_id)
    created = _first_missing(directory)  # removed again should the download fail: a failed check leaves nothing
    if _offline():
        raise _unavailable(directory, model_id, revision, "HF_HUB_OFFLINE is set", created is None)
    try:
        with _file_lock(_lock_path(directory)):
            if os.path.isdir(directory) and has_weights(directory):  # another process downloaded it meanwhile
                return directory
            from huggingface_hub import HfApi, snapshot_download

            started = time.monotonic()
            # One quick request first: snapshot_download retries for about 20 s before it gives up.
            HfApi().model_info(model_id, revision=revision, timeout=PROBE_TIMEOUT_S)
            log.info("downloading %s@%s into %s", model_id, revision, directory)
            snapshot_download(model_id, revision=revision, local_dir=directory, etag_timeout=PROBE_TIMEOUT_S)
    except BaseException as error:
        if created is not None and not has_weights(directory):
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(error, ModelUnavailableError) or not isinstance(error, Exception):
            raise
        # the hub's errors are many (connection, auth, missing revision, disk)
        raise _unavailable(directory, model_id, revision, _one_line(error), created is None) from error
    if not has_weights(directory):
        raise _unavailable(directory, model_id, revision, "the download holds no config.json and weights")
    log.info("downloaded %s@%s into %s in %.1f s", model_id, revision, directory, time.monotonic() - started)
    return directory


# ---------------------------------------------------------------- entry points


def resolve_model_dir(
    uri: str, *, model_id: Optional[str] = None, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> str:
    """A local directory holding the weights ``uri`` names, fetched first when needed (see the module doc).

    ``model_id``/``revision``: the hub checkpoint for a local directory without weights (``revision``
    defaults to ``PINNED_REVISIONS``). ``cache_dir``: where object-store copies go (default ``cache_root()``).
    Raises ``ModelUnavailableError`` (one line) when the weights cannot be had.
    """
    if not uri:
        raise ModelUnavailableError("no model directory given")
    if _remote(uri):
        return _copy_remote(uri, cache_dir)
    directory = _local(uri)
    if os.path.isdir(directory) and has_weights(directory):
        return directory
    return _download(directory, model_id, revision)


def check_model_source(uri: str, *, model_id: Optional[str], revision: Optional[str] = None) -> None:
    """Fail now, in one line, if the job could not get the weights ``uri`` names.

    A local directory with weights passes; an object-store prefix must hold ``config.json``; a local
    directory without weights is downloaded now (the moment before any work starts), which fails at once
    offline.
    """
    if not uri:
        raise ModelUnavailableError("no model directory given")
    if not _remote(uri):
        resolve_model_dir(uri, model_id=model_id, revision=revision)
        return
    from apache_beam.io.filesystems import FileSystems

    config = uri.rstrip("/") + "/config.json"
    try:
        found = FileSystems.exists(config)
    except Exception as error:  # bad bucket name, no access, no network
        raise ModelUnavailableError(f"cannot read the model prefix {uri} ({_one_line(error)})") from error
    if not found:
        download = f"hf download {model_id} --revision {revision or pinned_revision(model_id)} --local-dir DIR && "
        upload = download if model_id else ""
        raise ModelUnavailableError(
            f"{uri} is not a model directory (no config.json under it); upload one, e.g.: "
            f"{upload}gcloud storage rsync --recursive DIR {uri.rstrip('/')}"
        )
