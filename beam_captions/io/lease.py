"""One run at a time on an output: ``OUT/_lease.json`` names the run that holds it.

A run takes the lease before any work and gives it back at the end; while it runs, a thread refreshes it
every ``REFRESH_S`` seconds. A second run on an output whose lease is live is refused (one line, exit
status 2) unless it is forced. A lease is stale, and taken over without a word on the terminal, when its
process is gone (same host: its PID no longer runs) or it has not been refreshed for ``STALE_S`` seconds
(any host). Local outputs take a free lease atomically (a hard link: only one of two runs starting at
once gets it); on ``gs://`` the lease is an object written and read back, so two runs starting within
the same second may both get it, which this does not prevent.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import delete_quietly, read_json_or_none, write_json
from beam_captions.io.paths import is_local, local_path

__all__ = ["LEASE_NAME", "REFRESH_S", "STALE_S", "Lease", "LeaseHeld", "describe_holder", "holder_is_live", "lease_path"]

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
REFRESH_S = 60.0
STALE_S = 300.0  # five missed refreshes


class LeaseHeld(Exception):
    """A live run holds the output's lease; ``holder`` is its lease document."""

    def __init__(self, output: str, holder: dict[str, Any]):
        super().__init__(f"{output} is in use by another run ({describe_holder(holder)})")
        self.output, self.holder = output, holder


def lease_path(output: str) -> str:
    return FileSystems.join(output, LEASE_NAME)


def describe_holder(holder: dict[str, Any], now: Optional[float] = None) -> str:
    """``host H, PID P, started T UTC, refreshed N s ago``: who holds a lease."""
    now = time.time() if now is None else now
    refreshed = holder.get("refreshed")
    ago = f", refreshed {max(0, now - refreshed):.0f} s ago" if isinstance(refreshed, (int, float)) else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}{ago}"


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


def holder_is_live(holder: Optional[dict[str, Any]], now: Optional[float] = None, stale_s: float = STALE_S) -> bool:
    """Whether the run of a lease document still runs: refreshed within ``stale_s`` and, on this host,
    its process alive. An unreadable lease is not live."""
    if not isinstance(holder, dict):
        return False
    now = time.time() if now is None else now
    refreshed = holder.get("refreshed")
    if not isinstance(refreshed, (int, float)) or now - refreshed > stale_s:
        return False
    if holder.get("host") == socket.gethostname():
        return _pid_runs(holder.get("pid"))
    return True


def _mine(holder: Optional[dict[str, Any]]) -> bool:
    """A lease of this very process (an earlier run in it that could not give it back)."""
    return isinstance(holder, dict) and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _user() -> Optional[str]:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return None


class Lease:
    """This run's hold on ``output``: ``Lease.take(output)``, then ``release()`` at the end."""

    def __init__(self, output: str, refresh_s: float = REFRESH_S):
        self.output, self.path, self.refresh_s = output, lease_path(output), refresh_s
        self.document = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "refreshed": time.time(),
            "token": uuid.uuid4().hex,
        }
        self.displaced: Optional[dict[str, Any]] = None  # the lease this one replaced (stale, or forced)
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def take(cls, output: str, force: bool = False, refresh_s: float = REFRESH_S, stale_s: float = STALE_S) -> "Lease":
        """Take the lease of ``output`` and start refreshing it. Raises ``LeaseHeld`` when a live run
        holds it (``force`` takes it anyway: ``displaced`` is then that run's lease)."""
        lease = cls(output, refresh_s)
        if not lease._create():
            holder = read_json_or_none(lease.path)
            if holder_is_live(holder, stale_s=stale_s) and not _mine(holder) and not force:
                raise LeaseHeld(output, holder)
            lease.displaced = holder
            write_json(lease.path, lease.document)
        back = read_json_or_none(lease.path)
        if not back or back.get("token") != lease.document["token"]:  # another run took it at the same moment
            raise LeaseHeld(output, back or {})
        lease._thread = threading.Thread(target=lease._refresh_until_released, name="beam-captions-lease", daemon=True)
        lease._thread.start()
        return lease

    def _create(self) -> bool:
        """Create the lease file where there is none, atomically (local outputs); whether it did."""
        if not is_local(self.output):
            if FileSystems.exists(self.path):
                return False
            write_json(self.path, self.document)
            return True
        path = local_path(self.path)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-lease-")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.document, out, indent=2, sort_keys=True)
                out.write("\n")
            try:
                os.link(temporary, path)  # fails when a lease exists: only one of two runs creates it
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def refresh(self) -> bool:
        """Write the lease again with the time now; ``False`` (and no write) once another run took it."""
        holder = read_json_or_none(self.path)
        if not holder or holder.get("token") != self.document["token"]:
            if not self.lost:
                self.lost = True
                log.warning("another run took over the lease of %s (%s); two runs now write to it", self.output,
                            describe_holder(holder) if holder else "the lease was removed")
            return False
        self.document["refreshed"] = time.time()
        write_json(self.path, self.document)
        return True

    def _refresh_until_released(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.refresh():
                    return
            except Exception:  # noqa: BLE001 - an output briefly unreachable: try again next time
                log.info("could not refresh the lease of %s", self.output, exc_info=True)

    def release(self) -> None:
        """Stop refreshing and remove the lease, if it is still this run's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        holder = read_json_or_none(self.path)
        if holder and holder.get("token") == self.document["token"]:
            delete_quietly([self.path])
