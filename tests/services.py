"""Processes for tests: Beam's job service and worker pool on loopback ports, and process groups to kill whole.

Every process here starts in a session of its own, so that one ``os.killpg`` reaches everything it
started: the SDK worker a pool starts, the engine-core process vLLM spawns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Union

__all__ = [
    "CPU_ENV", "PortableServices", "free_port", "kill_groups", "log_tail", "portable_services", "start", "stop",
    "wait_for_port",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLINK_DIR = os.path.join(ROOT, "templates", "flink")
# What a subprocess that may start vLLM on this CPU-only machine needs (conftest sets the same in-process).
CPU_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}

PathLike = Union[str, Path]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log_path: PathLike, env: dict | None = None) -> subprocess.Popen:
    """``command`` in a session (and process group) of its own, output to ``log_path``."""
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=dict(os.environ, **CPU_ENV) if env is None else env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started by ``start``, with everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            os.killpg(proc.pid, signal.SIGKILL)  # children left behind in the group
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log_path: PathLike, chars: int = 3000) -> str:
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        return handle.read()[-chars:]


def wait_for_port(port: int, proc: subprocess.Popen, log_path: PathLike, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s:\n{log_tail(log_path)}")


class PortableServices(NamedTuple):
    job_endpoint: str
    pool_endpoint: str
    job: subprocess.Popen
    pool: subprocess.Popen
    job_log: Path
    pool_log: Path

    def runner_args(self) -> list[str]:
        """Beam options that run a job through these services, its SDK workers from the pool."""
        return ["--runner=PortableRunner", f"--job_endpoint={self.job_endpoint}",
                "--environment_type=EXTERNAL", f"--environment_config={self.pool_endpoint}"]


@contextlib.contextmanager
def portable_services(logs: PathLike) -> Iterator[PortableServices]:
    """Beam's Python job service and a worker pool (templates/flink/start_worker_pool.sh, this venv) on
    loopback ports, each in its own process group; stopped on exit (if still running)."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    job_port, pool_port = free_port(), free_port()
    job_log, pool_log = logs / "job_service.log", logs / "worker_pool.log"
    job = start([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                 f"--port={job_port}"], job_log)
    pool = start(["bash", os.path.join(FLINK_DIR, "start_worker_pool.sh"), "--venv", sys.prefix,
                  "--port", str(pool_port)], pool_log)
    try:
        wait_for_port(job_port, job, job_log)
        wait_for_port(pool_port, pool, pool_log)
        yield PortableServices(f"localhost:{job_port}", f"localhost:{pool_port}", job, pool, job_log, pool_log)
    finally:
        stop(pool)
        stop(job)


# ---------------------------------------------------------------------------------------------------
# Killing process groups, and proving nothing of them is left


def proc_stats() -> dict[int, list[str]]:
    """Every live process: pid -> the fields of ``/proc/PID/stat`` after the command name (state first)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:  # gone meanwhile
            continue
        found[int(name)] = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and brackets
    return found


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every live process: pid -> (parent pid, process group, state letter)."""
    return {pid: (int(fields[1]), int(fields[2]), fields[0]) for pid, fields in proc_stats().items()}


def _members(groups: set[int], roots: set[int]) -> set[int]:
    """Processes (not zombies) in ``groups`` or descended from ``roots``."""
    table = _processes()
    members = {pid for pid, (_, group, state) in table.items() if group in groups and state != "Z"}
    frontier = set(roots)
    while frontier:
        children = {pid for pid, (parent, _, state) in table.items() if parent in frontier and state != "Z"}
        frontier = children - members
        members |= children
    return members


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def kill_groups(*procs: subprocess.Popen, timeout: float = 30) -> dict[int, str]:
    """SIGKILL the process group of each of ``procs`` (started by ``start``), in that order, at once; wait
    until none of their processes is left (descendants that left the group included). Returns the
    processes killed: pid -> command line."""
    groups = {proc.pid for proc in procs}
    killed = {pid: _command(pid) for pid in _members(groups, groups)}
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in set(killed) - groups:  # a descendant in a session of its own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        table = _processes()
        left = {pid for pid in _members(groups, groups) | set(killed) if pid in table and table[pid][2] != "Z"}
        if not left:
            return killed
        assert time.monotonic() < deadline, f"processes left {timeout} s after SIGKILL: {sorted(left)}"
        time.sleep(0.05)
