"""One run at a time on an output: ``OUT/_lease.json`` names the run that holds it.

A run takes the lease before any work and gives it back at the end; while it runs, the lease is refreshed
every ``REFRESH_S`` seconds. A second run on an output whose lease is live is refused (one line, exit
status 2) unless it is forced. Each lease says how it ends (``runs_in``):

* ``process``: a local run (the DirectRunner), whose job is the process that took the lease. A thread of
  that process refreshes it; it is stale once its process is gone (same host: its PID no longer runs) or it
  has not been refreshed for ``STALE_S`` seconds (any host).
* ``job``: a job that runs elsewhere (the Flex Template, a portable or Dataflow runner). The job's workers
  refresh it (``io.lease_keeper``), and so does a launcher that waits for the job; the job's last step
  gives it back. It is stale once nothing refreshed it for ``JOB_STALE_S`` seconds (a job that died, or
  whose workers never started): a launcher's PID says nothing about the job.

The lease states its own ``refresh_s`` and ``stale_s``. Every change is conditional on the version read
(``io.conditional``: on ``gs://`` a generation precondition, so of two runs taking a free or stale lease
at once exactly one gets it; on a local disk a free lease is created atomically with a hard link).

``--force`` joins a live lease instead of replacing it: the forced run becomes the lease's first holder and
the runs it displaced stay listed under ``others`` and keep refreshing their entry. A run that ends removes
only its own entry; the file goes when no live run is left in it, so a forced run that ends first never
frees an output another run still writes to.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Optional

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.conditional import read_with_token, remove_if_unchanged, write_if_unchanged
from beam_captions.io.files import json_bytes, parse_json_object
from beam_captions.io.paths import is_local, local_path

__all__ = [
    "JOB", "JOB_STALE_S", "LEASE_NAME", "PROCESS", "REFRESH_S", "STALE_S", "Lease", "LeaseHeld", "claim",
    "describe_holder", "holder_is_live", "leave", "lease_path", "live_members", "members", "refresh_member",
]

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
REFRESH_S = 60.0
STALE_S = 300.0  # a local run's lease: five missed refreshes
JOB_STALE_S = 1800.0  # a job's lease: its workers may take many minutes to start (a large image, GPU quota)
PROCESS, JOB = "process", "job"
_TRIES = 8  # conditional changes lost to concurrent ones before giving up


class LeaseHeld(Exception):
    """A live run holds the output's lease; ``holder`` is its lease document."""

    def __init__(self, output: str, holder: dict[str, Any]):
        super().__init__(f"{output} is in use by another run ({describe_holder(holder)})")
        self.output, self.holder = output, holder


def lease_path(output: str) -> str:
    return FileSystems.join(output, LEASE_NAME)


def members(document: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs a lease document names: its first holder, then ``others`` (runs a ``--force`` joined)."""
    if not isinstance(document, dict):
        return []
    first = {key: value for key, value in document.items() if key != "others"}
    others = document.get("others")
    return [first] + [m for m in others if isinstance(m, dict)] if isinstance(others, list) else [first]


def _document(runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The lease document of ``runs`` (None: no run left)."""
    if not runs:
        return None
    return {**runs[0], "others": runs[1:]} if len(runs) > 1 else dict(runs[0])


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def _member_is_live(member: dict[str, Any], now: float, stale_s: Optional[float]) -> bool:
    refreshed = member.get("refreshed")
    limit = _number(member.get("stale_s"), STALE_S if stale_s is None else stale_s)
    if not isinstance(refreshed, (int, float)) or now - refreshed > limit:
        return False
    if member.get("runs_in") != JOB and member.get("host") == socket.gethostname():
        return _pid_runs(member.get("pid"))
    return True


def live_members(document: Optional[dict[str, Any]], now: Optional[float] = None,
                 stale_s: Optional[float] = None) -> list[dict[str, Any]]:
    """The runs of a lease document that still run (``stale_s``: for entries that state none)."""
    now = time.time() if now is None else now
    return [m for m in members(document) if _member_is_live(m, now, stale_s)]


def holder_is_live(holder: Optional[dict[str, Any]], now: Optional[float] = None,
                   stale_s: Optional[float] = None) -> bool:
    """Whether a run of a lease document still runs: refreshed within its stated ``stale_s`` and, for a
    local run on this host, its process alive. An unreadable lease is not live."""
    return bool(live_members(holder, now, stale_s))


def describe_holder(holder: dict[str, Any], now: Optional[float] = None) -> str:
    """``host H, PID P, started T UTC, refreshed N s ago`` (a job: ``a job launched from host H, ...``):
    who holds a lease (its first live run)."""
    now = time.time() if now is None else now
    runs = live_members(holder, now) or members(holder) or [{}]
    first = runs[0]
    refreshed = first.get("refreshed")
    ago = f", refreshed {max(0, now - refreshed):.0f} s ago" if isinstance(refreshed, (int, float)) else ""
    text = f"host {first.get('host')}, PID {first.get('pid')}, started {first.get('started')}{ago}"
    more = f", and {len(runs) - 1} more run(s) given --force" if len(runs) > 1 else ""
    return (f"a job launched from {text}" if first.get("runs_in") == JOB else text) + more


def _pid_runs(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _mine(member: dict[str, Any]) -> bool:
    """A local run's entry of this very process (an earlier run in it that could not give it back)."""
    return member.get("runs_in") != JOB and member.get("host") == socket.gethostname() and member.get("pid") == os.getpid()


def _user() -> Optional[str]:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return None


def _create_local(path: str, data: bytes) -> bool:
    """Create a local lease where there is none, atomically (a hard link: of two creators one wins)."""
    path = local_path(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-lease-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


_KEEP = object()  # what a change returns to leave the lease as it is


def _change(path: str, change: Callable[[Optional[dict[str, Any]]], Any]) -> Any:
    """Read the lease and apply ``change`` (the document, or None when there is none) to it, conditionally
    on the version read; read again and retry when another run changed it in between. ``change`` returns
    the new document, None to remove the file, or ``_KEEP``; the result is what it returned last."""
    for _ in range(_TRIES):
        data, token = read_with_token(path)
        wanted = change(parse_json_object(data) if data is not None else None)
        if wanted is _KEEP:
            return wanted
        if wanted is None:
            if token is None or remove_if_unchanged(path, token) is not False:
                return wanted
            continue
        body = json_bytes(wanted)
        if token is None and is_local(path):
            if _create_local(path, body):
                return wanted
        elif write_if_unchanged(path, body, token):
            return wanted
    raise RuntimeError(f"{path}: changed by other runs {_TRIES} times in a row; try again")


def refresh_member(path: str, token: str, min_age_s: float = 0.0) -> bool:
    """Write the time now into the entry ``token`` of the lease at ``path`` (not when it was refreshed less
    than ``min_age_s`` ago: many workers of one job refresh one lease); False when the lease no longer
    names that run (given back, or taken over)."""
    found = []

    def change(document):
        runs = members(document)
        found[:] = [m for m in runs if m.get("token") == token]
        if not found or time.time() - _number(found[0].get("refreshed"), 0.0) < min_age_s:
            return _KEEP
        return _document([{**m, "refreshed": time.time()} if m.get("token") == token else m for m in runs])

    _change(path, change)
    return bool(found)


def leave(path: str, token: str) -> None:
    """Remove the entry ``token`` from the lease at ``path``: the file goes when no live run is left in it,
    otherwise the next live run becomes its first holder. Entries of other runs are never removed."""

    def change(document):
        runs = members(document)
        if not any(m.get("token") == token for m in runs):
            return _KEEP
        others = [m for m in runs if m.get("token") != token]
        return _document(live_members(_document(others)))

    _change(path, change)


def _new_member(runs_in: str, refresh_s: float, stale_s: float, token: Optional[str] = None) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": _user(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "refreshed": time.time(),
        "token": token or uuid.uuid4().hex,
        "runs_in": runs_in,
        "refresh_s": refresh_s,
        "stale_s": stale_s,
    }


def _take(output: str, member: dict[str, Any], force: bool) -> Optional[dict[str, Any]]:
    """Put ``member`` in the lease of ``output`` as its first holder; the document it replaced (None: there
    was none). Raises ``LeaseHeld`` when a live run of another process holds it and not ``force``."""
    path = lease_path(output)
    replaced: list[Optional[dict[str, Any]]] = [None]

    def change(document):
        replaced[0] = document
        live = [m for m in live_members(document) if not _mine(m) and m.get("token") != member["token"]]
        if live and not force:
            raise LeaseHeld(output, document)
        return _document([member, *(live if force else [])])

    _change(path, change)
    data, _ = read_with_token(path)  # a local disk cannot replace conditionally: two takers at once, one wins
    if not any(m.get("token") == member["token"] for m in members(parse_json_object(data))):
        raise LeaseHeld(output, parse_json_object(data) or {})
    return replaced[0]


def claim(output: str, token: str) -> None:
    """A job's check at its start (on its workers): the lease of ``output`` names this job (``token``), or
    is free or stale and is taken for it. Raises ``LeaseHeld`` when another live run holds it: a job that
    its launcher did not get the lease for, or whose lease expired before its workers started and another
    run took it, writes nothing."""
    path = lease_path(output)
    data, _ = read_with_token(path)
    if any(m.get("token") == token for m in members(parse_json_object(data))):
        return
    _take(output, _new_member(JOB, REFRESH_S, JOB_STALE_S, token), force=False)
    log.warning("the lease of %s had expired before this job's workers started; taken again for the job", output)


class Lease:
    """This run's hold on ``output``: ``Lease.take(output)``, then ``release()`` at the end."""

    def __init__(self, output: str, refresh_s: Optional[float] = None, stale_s: Optional[float] = None,
                 runs_in: str = PROCESS):
        self.output, self.path = output, lease_path(output)
        self.refresh_s = REFRESH_S if refresh_s is None else refresh_s
        self.runs_in = runs_in
        self.document = _new_member(runs_in, self.refresh_s, (JOB_STALE_S if runs_in == JOB else STALE_S)
                                    if stale_s is None else stale_s)
        self.displaced: Optional[dict[str, Any]] = None  # the lease this one replaced (stale) or joined (forced)
        self.lost = False
        self.left_to_job = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def token(self) -> str:
        return self.document["token"]

    @classmethod
    def take(cls, output: str, force: bool = False, refresh_s: Optional[float] = None,
             stale_s: Optional[float] = None, runs_in: str = PROCESS, refresh: bool = True) -> "Lease":
        """Take the lease of ``output`` and (``refresh``: a launcher that waits for its job) start refreshing
        it every ``refresh_s`` (``REFRESH_S``); it goes stale ``stale_s`` after its last refresh
        (``STALE_S``, ``JOB_STALE_S`` for a job). Raises ``LeaseHeld`` when a live run holds it; ``force``
        joins it instead (``displaced`` is then that lease)."""
        lease = cls(output, refresh_s, stale_s, runs_in)
        lease.displaced = _take(output, lease.document, force)
        if refresh:
            lease._thread = threading.Thread(target=lease._refresh_until_released, name="beam-captions-lease",
                                             daemon=True)
            lease._thread.start()
        return lease

    def refresh(self) -> bool:
        """Write this run's entry again with the time now; ``False`` (and no write) once the lease no longer
        names this run (another run took it over, or removed it)."""
        if refresh_member(self.path, self.token):
            return True
        if not self.lost:
            self.lost = True
            data, _ = read_with_token(self.path)
            holder = parse_json_object(data)
            log.warning("another run took over the lease of %s (%s); two runs now write to it", self.output,
                        describe_holder(holder) if holder else "the lease was removed")
        return False

    def _refresh_until_released(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.refresh():
                    return
            except Exception:  # noqa: BLE001 - an output briefly unreachable: try again next time
                log.info("could not refresh the lease of %s", self.output, exc_info=True)

    def _stop_refreshing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def leave_to_job(self) -> None:
        """The launcher stops waiting while its job keeps running: the job's workers keep refreshing the
        lease and its last step gives it back (``release`` then leaves it alone)."""
        self.left_to_job = True
        self._stop_refreshing()

    def release(self) -> None:
        """Stop refreshing and remove this run's entry (the file, when no other live run is in it)."""
        self._stop_refreshing()
        if not self.left_to_job:
            leave(self.path, self.token)

