"""Issue 29, part 5 and 7: one writer per output. The lease is taken conditionally (of two takers, one wins,
on gs:// by a generation precondition), a job's lease outlives its launcher's PID until its stated timeout,
a job's workers keep it fresh, and a forced run never removes a lease that another live run still holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from gcs import gcs  # noqa: F401  (the module-scoped fixture)

from beam_captions.io import lease as lease_module
from beam_captions.io import lease_keeper
from beam_captions.io.lease import JOB, Lease, LeaseHeld, holder_is_live, lease_path, leave, refresh_member


def read(out: str) -> dict:
    from beam_captions.io.conditional import read_with_token

    data, _ = read_with_token(lease_path(out))
    return json.loads(data) if data is not None else None


def other_run(out: str, pid: int, token: str = "theirs", **fields) -> None:
    """The lease of a live local run of another process on this host."""
    import socket

    from beam_captions.io.files import write_json

    write_json(lease_path(out), {"host": socket.gethostname(), "pid": pid, "started": "2026-01-01 00:00:00",
                                 "refreshed": time.time(), "token": token, "runs_in": "process", **fields})


@pytest.fixture(params=["local", "gs"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    emulator = request.getfixturevalue("gcs")
    if emulator.client.lookup_bucket("leases-29") is None:
        emulator.create_bucket("leases-29")
    return f"gs://leases-29/run-{time.monotonic_ns()}"


def test_of_two_runs_taking_a_free_lease_at_once_exactly_one_gets_it(output, monkeypatch):
    """Both read "no lease", then the first takes it; the second's write (conditional on "still none")
    fails, it reads again and is refused. Without the precondition the second would overwrite the first."""
    real = lease_module.read_with_token
    both_read = threading.Barrier(2)
    first_done = threading.Event()
    roles = {}

    def racing_read(path):
        found = real(path)
        name = threading.current_thread().name
        if name in roles and not roles[name]["read"]:
            roles[name]["read"] = True
            both_read.wait(timeout=10)
            if name == "second":
                first_done.wait(timeout=10)
        return found

    monkeypatch.setattr(lease_module, "read_with_token", racing_read)
    outcome = {}

    def take(name):
        try:
            outcome[name] = Lease.take(output, runs_in=JOB, refresh=False)
        except LeaseHeld as held:
            outcome[name] = held
        finally:
            if name == "first":
                first_done.set()

    threads = [threading.Thread(target=take, args=(name,), name=name) for name in ("first", "second")]
    for thread in threads:
        roles[thread.name] = {"read": False}
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert isinstance(outcome["first"], Lease) and isinstance(outcome["second"], LeaseHeld)
    assert read(output)["token"] == outcome["first"].token
    outcome["first"].release()
    assert read(output) is None


def test_a_forced_run_never_removes_a_lease_another_live_run_holds(output, other_process):
    """The issue's case: a run holds the output, a forced run joins it and ends first; the first run still
    holds the lease, and a third run is refused."""
    other_run(output, other_process)
    forced = Lease.take(output, force=True, refresh=False)
    document = read(output)
    assert document["token"] == forced.token and [m["token"] for m in document["others"]] == ["theirs"]
    assert refresh_member(lease_path(output), "theirs")  # the joined run refreshes its own entry
    forced.release()
    assert read(output)["token"] == "theirs" and "others" not in read(output)
    with pytest.raises(LeaseHeld, match=f"PID {other_process}"):
        Lease.take(output, refresh=False)


def test_when_the_joined_run_ends_first_the_forced_run_keeps_the_lease(output, other_process):
    other_run(output, other_process)
    forced = Lease.take(output, force=True, runs_in=JOB, refresh=False)  # (a job: not this process's own)
    leave(lease_path(output), "theirs")  # the first run ends
    assert read(output)["token"] == forced.token and "others" not in read(output)
    with pytest.raises(LeaseHeld):
        Lease.take(output, refresh=False)
    forced.release()
    assert read(output) is None


def test_a_dead_jobs_lease_is_taken_over_after_its_stated_timeout(tmp_path):
    """A job's lease names its launcher, whose PID is gone while the job runs: only the timeout the lease
    states ends it."""
    out = str(tmp_path / "out")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other_run(out, int(gone.stdout), token="job", runs_in=JOB, stale_s=0.6, refresh_s=0.1)
    with pytest.raises(LeaseHeld, match="a job launched from host"):
        Lease.take(out, refresh=False)
    time.sleep(0.7)
    taken = Lease.take(out, refresh=False)
    assert taken.displaced["token"] == "job" and read(out)["token"] == taken.token
    taken.release()


def test_a_job_lease_states_its_timeout_and_a_local_runs_lease_its_own():
    job, local = Lease("/nowhere", runs_in=JOB), Lease("/nowhere")
    assert (job.document["stale_s"], local.document["stale_s"]) == (lease_module.JOB_STALE_S, lease_module.STALE_S)
    assert lease_module.JOB_STALE_S == 1800 and lease_module.STALE_S == 300  # as the README states


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_jobs_workers_keep_its_lease_fresh_until_it_is_given_back(output):
    launched = Lease.take(output, runs_in=JOB, refresh=False, refresh_s=0.1, stale_s=0.5)
    lease_keeper.keep(output, launched.token)  # the job's first step on a worker
    time.sleep(1.0)  # twice the stated timeout: only the worker's refreshes keep it live
    assert holder_is_live(read(output)) and read(output)["token"] == launched.token
    with pytest.raises(LeaseHeld):
        Lease.take(output, refresh=False)
    leave(lease_path(output), launched.token)  # the job's last step
    key = (lease_path(output), launched.token)
    assert wait_until(lambda: not lease_keeper._KEEPERS[key].is_alive()), "the worker's thread did not end"
    assert read(output) is None  # and it never wrote the lease again


def test_a_job_that_does_not_hold_the_lease_is_refused_on_its_workers(output, other_process):
    other_run(output, other_process)
    with pytest.raises(LeaseHeld):
        lease_keeper.keep(output, "a-job-whose-launcher-took-no-lease")
    assert read(output)["token"] == "theirs"


def test_a_clip_write_adopts_the_jobs_lease_on_a_worker_without_its_first_steps(tmp_path):
    out = str(tmp_path / "out")
    launched = Lease.take(out, runs_in=JOB, refresh=False, refresh_s=0.1, stale_s=0.5)
    lease_keeper.touch(out)
    time.sleep(1.0)
    assert holder_is_live(read(out))
    launched.release()
    assert wait_until(lambda: not any(t.is_alive() for k, t in lease_keeper._KEEPERS.items() if k[0] == lease_path(out)))
    assert not os.path.exists(lease_path(out))
