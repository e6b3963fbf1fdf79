"""An engine never outlives its run (issue 30 §3): a real run is SIGKILLed once its vLLM engine is up, and
30 s later no process it started is left, the engine core and its worker included.

Only the run's own process gets the signal (``kill -KILL PID``, not its process group). Its engine's
processes are frozen first (SIGSTOP), as a hung engine would be: only the kernel can end them then
(``beam_captions.inference.orphans``), not vLLM noticing that its parent is gone (the worker's death pipe).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clips import make_clip
from conftest import VLLM_KWARGS
from services import log_tail, proc_stats, start

ENGINE_WAIT_S = 240  # for the engine's core and worker processes to start
LEFT_AFTER_S = 30  # the bound: nothing of the run is left this long after its kill
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")  # vLLM's process titles (core; its CPU worker)

ProcessId = tuple[int, int]  # pid, start time (clock ticks since boot): a pid reused later is another process


def _table() -> dict[int, tuple[int, str, int]]:
    """Every live process: pid -> (parent pid, state letter, start time)."""
    return {pid: (int(fields[1]), fields[0], int(fields[19])) for pid, fields in proc_stats().items()}


def descendants(root: int) -> set[ProcessId]:
    """The live processes (not zombies) descended from ``root``."""
    table = _table()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (parent, state, _) in table.items() if parent in frontier and state != "Z"} - found
        found |= frontier
    return {(pid, table[pid][2]) for pid in found}


def alive(processes: set[ProcessId]) -> set[ProcessId]:
    """Those of ``processes`` still running: the same pid and start time, and not a zombie (a zombie holds
    nothing; reaping it is its new parent's work)."""
    table = _table()
    return {(pid, started) for pid, started in processes
            if pid in table and table[pid][2] == started and table[pid][1] != "Z"}


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def test_a_run_killed_with_sigkill_leaves_no_engine_process(tmp_path, captioner_dir):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(str(clips / "clip.mp4"), 64, 10.0, 96, 64)  # four windows: the run is still captioning at the kill
    command = [sys.executable, "-m", "beam_captions", "--input", str(clips), "--output", str(tmp_path / "out"),
               "--generate-captions", "--model-dir", captioner_dir, "--captioning-window-size", "16",
               "--captioning-remainder-threshold", "8", "--captioning-max-output-tokens", "8", "--no-gallery",
               "--vllm-kwargs", json.dumps(VLLM_KWARGS)]
    log = tmp_path / "run.log"
    run = start(command, log)  # a session of its own: nothing here shares the run's process group
    started: set[ProcessId] = set()
    try:
        deadline = time.monotonic() + ENGINE_WAIT_S
        while not all(any(title(pid) == name for pid, _ in started) for name in ENGINE_TITLES):
            assert run.poll() is None, f"the run ended before its engine was up:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"no engine processes in {ENGINE_WAIT_S} s:\n{log_tail(log)}"
            time.sleep(0.05)
            started |= descendants(run.pid)
        started |= descendants(run.pid)
        for pid, _ in started:
            if title(pid) in ENGINE_TITLES:
                os.kill(pid, signal.SIGSTOP)  # hung: nothing of vLLM's own runs in it any more
        os.kill(run.pid, signal.SIGKILL)  # kill -KILL of the run's process alone
        run.wait(timeout=30)
        killed = time.monotonic()
        while alive(started) and time.monotonic() - killed < LEFT_AFTER_S:
            time.sleep(0.2)
        left = {pid: title(pid) for pid, _ in alive(started)}
        assert not left, f"processes of the run left {LEFT_AFTER_S} s after its SIGKILL: {left}"
        print(f"all {len(started)} processes of the run gone {time.monotonic() - killed:.1f} s after its SIGKILL")
    finally:
        for pid, _ in alive(started):  # this test's own leftovers, never another process
            os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()


# A process that forks a child (vLLM's engine core stands in) and exits: at once, or once the child has asked to
# die with it. The child waits for its parent's death where asked, then asks.
TIED_CHILD = """
import multiprocessing, os, sys, time
from beam_captions.inference.orphans import die_with_parent

def child(parent, tied, late):
    while late and os.getppid() == parent:  # asks only once its parent is gone
        time.sleep(0.01)
    die_with_parent()
    tied.set()
    time.sleep(600)

if __name__ == "__main__":
    late = sys.argv[1] == "late"
    context = multiprocessing.get_context("fork")
    tied = context.Event()
    process = context.Process(target=child, args=(os.getpid(), tied, late))
    process.start()
    print(process.pid, flush=True)
    if not late:
        tied.wait(60)
    os._exit(0)  # as a SIGKILL would: nothing of multiprocessing's exit runs
"""


@pytest.mark.parametrize("when", ["before", "late"])
def test_an_engine_process_dies_with_its_parent_even_if_the_parent_died_before_it_asked(when):
    """``before``: the kernel kills the child when its parent goes. ``late``: the parent was gone before the
    child asked (the child was still importing vLLM): the child ends itself."""
    parent = subprocess.Popen([sys.executable, "-c", TIED_CHILD, when], stdout=subprocess.PIPE, text=True)
    with parent.stdout:  # the child holds the pipe too: read its pid, not to the end
        child = int(parent.stdout.readline())
    table = _table()
    process = {(child, table[child][2])} if child in table else set()
    try:
        assert parent.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while alive(process) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(process), f"the child outlived its parent ({when})"
    finally:
        for pid, _ in alive(process):
            os.kill(pid, signal.SIGKILL)
