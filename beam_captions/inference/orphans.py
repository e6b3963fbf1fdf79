"""vLLM's engine processes die with the process that started them, even when it is SIGKILLed (Linux).

vLLM starts its engine core as a child process, and the core starts its workers as children of its own.
When the run is killed (``kill -KILL``, a second Ctrl-C), nothing tells them: they live on under PID 1,
holding the model's memory (on a GPU, the card a re-run needs). ``tie_engine_processes`` makes each of
them ask the kernel, first thing, for SIGKILL when its parent goes (``prctl(PR_SET_PDEATHSIG)``): the
core dies with the run, each worker with its core, whatever way the parent ends.

The kernel sends that signal when the parent *thread* that started the child ends. vLLM starts the core
from the engine's event-loop thread (``Engine._start``), which lives exactly as long as the engine, and
the workers from the core's main thread.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable

__all__ = ["die_with_parent", "tie_engine_processes"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The entry points of vLLM's engine processes, as "module:Class.attribute" (each is a process target).
CORE = "vllm.v1.engine.core:EngineCoreProc.run_engine_core"
WORKER = "vllm.v1.executor.multiproc_executor:WorkerProc.worker_main"
# The engine processes each kind starts (without a core process, VLLM_ENABLE_V1_MULTIPROCESSING=0, the run
# starts the workers itself).
CHILDREN = {CORE: (WORKER,), WORKER: ()}

_ORIGINALS: dict[str, Callable[..., Any]] = {}  # entry point -> vLLM's own function, once tied here


def _owner_and_name(entry_point: str) -> tuple[Any, str]:
    module_name, _, qualified = entry_point.partition(":")
    class_name, _, attribute = qualified.partition(".")
    return getattr(importlib.import_module(module_name), class_name), attribute


def tie_engine_processes(entry_points: tuple[str, ...] = (CORE, WORKER)) -> None:
    """From now on, every vLLM engine-core and worker process started from this process dies with its parent."""
    for entry_point in entry_points:
        if entry_point in _ORIGINALS:
            continue
        owner, attribute = _owner_and_name(entry_point)
        _ORIGINALS[entry_point] = getattr(owner, attribute)
        # A partial of a module function pickles by name: a spawned child imports this module to run it.
        setattr(owner, attribute, functools.partial(_run_tied, entry_point))


def _run_tied(entry_point: str, *args: Any, **kwargs: Any) -> Any:
    """An engine process's entry point: die with the parent, tie this process's own children, then run vLLM's."""
    die_with_parent()
    original = _ORIGINALS.get(entry_point)  # set here when forked from a tied process; not in a spawned one
    if original is None:
        owner, attribute = _owner_and_name(entry_point)
        original = getattr(owner, attribute)
    tie_engine_processes(CHILDREN[entry_point])  # the core's workers too
    return original(*args, **kwargs)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (thread) ends; exit now if it is gone already."""
    if not sys.platform.startswith("linux"):  # no such request elsewhere: the children may outlive a killed run
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the request: nothing will signal
        os._exit(1)
