"""A job's workers keep its lease (``io.lease``, ``runs_in: job``) fresh for as long as they run.

One daemon thread per worker process and lease entry refreshes it every ``refresh_s`` (as the lease states),
skipping the write when another worker of the job refreshed it within half of that (every change is
conditional on the version read, so many workers never overwrite each other or a takeover). The thread
ends when the lease no longer names the job (its last step gave it back, or a run took it over) or with
its process: a job that dies stops refreshing, and its lease goes stale ``stale_s`` after its last refresh.

``keep`` starts the thread for a known entry (the job's first step, which also checks that the job holds the
lease: ``io.lease.claim``); ``touch`` (each clip write) adopts the lease's one live job entry in a process
that runs no thread for it yet, at most once per ``REFRESH_S``: the job's model workers, which may outlive
the workers of its first steps.
"""

from __future__ import annotations

import logging
import threading
import time

from beam_captions.io.conditional import read_with_token
from beam_captions.io.files import parse_json_object
from beam_captions.io.lease import JOB, REFRESH_S, claim, lease_path, live_members, members, refresh_member

__all__ = ["keep", "touch"]

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_KEEPERS: dict[tuple[str, str], threading.Thread] = {}  # (lease path, entry token) -> its thread
_LOOKED: dict[str, float] = {}  # lease path -> when ``touch`` last read it (time.monotonic)


def _running(path: str, token: str) -> bool:
    thread = _KEEPERS.get((path, token))
    return thread is not None and thread.is_alive()


def _refresh_while_named(path: str, token: str) -> None:
    while True:
        try:
            data, _ = read_with_token(path)
            entry = next((m for m in members(parse_json_object(data)) if m.get("token") == token), None)
            if entry is None:
                return
            wait = entry.get("refresh_s")
            wait = float(wait) if isinstance(wait, (int, float)) and wait > 0 else REFRESH_S
            time.sleep(wait)
            if not refresh_member(path, token, min_age_s=wait / 2):
                return
        except Exception:  # noqa: BLE001 - an output briefly unreachable: try again next time
            log.info("could not refresh the lease %s", path, exc_info=True)
            time.sleep(REFRESH_S)


def _start(path: str, token: str) -> None:
    with _LOCK:
        if _running(path, token):
            return
        thread = threading.Thread(target=_refresh_while_named, args=(path, token), daemon=True,
                                  name="beam-captions-job-lease")
        _KEEPERS[(path, token)] = thread
        thread.start()


def keep(output: str, token: str) -> None:
    """The job ``token`` holds the lease of ``output`` (``claim``: refused with ``LeaseHeld`` otherwise), and
    this process refreshes it from now on."""
    path = lease_path(output)
    if _running(path, token):
        return
    claim(output, token)
    _start(path, token)


def touch(output: str) -> None:
    """In a process that refreshes no lease of ``output`` yet: adopt the lease's job entry when it has exactly
    one live one (a job writes here). Reads the lease at most once per ``REFRESH_S`` per process."""
    path = lease_path(output)
    now = time.monotonic()
    with _LOCK:
        if now - _LOOKED.get(path, -REFRESH_S) < REFRESH_S or any(
                key[0] == path and thread.is_alive() for key, thread in _KEEPERS.items()):
            return
        _LOOKED[path] = now
    try:
        data, _ = read_with_token(path)
    except Exception:  # noqa: BLE001 - never a reason for a clip's write to fail; the job's first steps keep it
        log.info("could not read the lease %s", path, exc_info=True)
        return
    jobs = [m for m in live_members(parse_json_object(data)) if m.get("runs_in") == JOB]
    if len(jobs) == 1 and isinstance(jobs[0].get("token"), str):
        _start(path, jobs[0]["token"])
