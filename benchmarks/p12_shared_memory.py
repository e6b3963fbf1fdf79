"""P12: peak memory of the engine process when SDK processes share one engine, with its bound per engine.

With ``share_model_across_processes`` the SDK processes of a machine reach one ``WindowServer``
through Beam's ``multi_process_shared`` proxy; every window sent to it reaches the process that hosts
it (the "engine process") and is held there while the model works on it: its frames lent through a
shared-memory block (``serve_by_reference``, today's code) or, before, pickled through the proxy. The bound on
windows in flight is per engine, so that process holds at most ``bound`` windows whatever the
number of SDK processes; a bound per process let it hold ``processes x bound``.

Each run spawns a fresh host process (a clean RSS baseline) that acquires the ``MultiProcessShared``
first, so the server lives in it, and samples its own RSS from a thread every 10 ms; it also reads
the kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the baseline
where the kernel lets it). Then 4 spawned SDK processes send windows from 8 threads each (make the
window, ``reserve``, ``serve``), each window carrying 16 random 476x840 RGB model frames (~19 MB,
16:9 model frames of a 1080p clip), made in the sender. The model step is a stand-in
``inference_fn`` that reads every page of the frames (as a model does), holds the window 0.2 s and returns it
without frames; no engine starts.

- ours: the bound per engine, 8 (``caption_batch_size=8``, today's code);
- baseline: bound 32 = 4 processes x 8, what a per-process bound of 8 let into the engine process.

The figure is the host's peak RSS above its baseline in MiB, ours over baseline (target <= 0.5), with
glibc's malloc as it comes. The same pair runs again with the host's ``MALLOC_MMAP_THRESHOLD_`` fixed
at 1 MiB (``fixed_mmap_threshold`` in the details): by default glibc raises its mmap threshold to the
last large block freed, so the ~19 MB buffers each connection thread receives a window into come from
per-thread arenas afterwards and stay in RSS once freed, whatever the bound; with a fixed threshold
every such buffer is its own mapping, given back on free, and RSS follows the windows actually held.
The details carry ``max_held()`` of each run, windows/s (from the first sender's start to the last
one's end) and RSS at the end of each run.

P12s, the same runs at the bound per engine (8) and glibc's malloc as it comes: the frames lent through
shared memory (ours, today's code) against pickled through the proxy (the senders'
``BEAM_CAPTIONS_SHARED_FRAMES=0``, the path before), interleaved. The engine process's RSS counts the
pages of the blocks it has read (``RssShmem``, shared with the senders, not its own); the details also
carry the sampled peaks of its private memory (``RssAnon``) and of those pages.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any, Optional

from common import Figure, interleaved, median_ratio, reset_peak_rss

from beam_captions.inference.shared_frames import SWITCH

MB = 2**20
PROCESSES = 4
THREADS = 8
FRAMES, HEIGHT, WIDTH = 16, 476, 840  # 16:9 model frames of a 1080p clip: ~19 MB (18.3 MiB) a window
HOLD_S = 0.2
BOUND = 8


def _hold(engine, batch, request):
    """The stand-in model step: read every page of the window's frames, hold it 0.2 s, return it without frames."""
    for record in batch:
        int(record.frames.reshape(-1)[::4096].max())  # a model reads its input: every page is in this process
    time.sleep(HOLD_S)
    return [record.replace(frames=None, caption="c") for record in batch]


def _handler(bound: int):
    from beam_captions.inference.caption_handler import VideoCaptionHandler

    return VideoCaptionHandler("unused-p12", caption_batch_size=bound, inference_fn=_hold, share_across_processes=True)


def _shared(tag: str, bound: Optional[int]):
    """The machine's shared server under ``tag``: made from a handler at ``bound`` by the first to acquire it
    (the host); ``bound`` None for a sender, which only connects (and so does not import the handler's torch)."""
    from apache_beam.utils import multi_process_shared

    constructor = _handler(bound).load_model if bound is not None else _not_first
    return multi_process_shared.MultiProcessShared(constructor, tag=tag, always_proxy=True)


def _not_first():
    raise RuntimeError("a sender got to the shared server before the engine process made it")


def _status_kb(field: str) -> Optional[int]:
    return _status_kbs(field).get(field)


def _status_kbs(*fields: str) -> dict[str, int]:
    """``fields`` of ``/proc/self/status`` in kB (those the kernel has)."""
    found = {}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                name = line.split(":", 1)[0]
                if name in fields:
                    found[name] = int(line.split()[1])
    except OSError:
        pass
    return found


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return (_status_kb("VmRSS") or 0) * 1024


def _host(tag: str, bound: int, conn) -> None:
    """The engine process: hosts the shared server, samples its RSS until the parent says the senders are done."""
    import gc

    server = _shared(tag, bound).acquire()  # first to acquire: the server is created in this process
    server.held()  # the proxy is up
    gc.collect()
    time.sleep(0.2)
    baseline = _rss()
    hwm_reset = reset_peak_rss()
    peak = [baseline]
    split = {"RssAnon": 0, "RssShmem": 0}  # sampled peaks, kB: private memory, shared pages read
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            for field, kb in _status_kbs(*split).items():
                split[field] = max(split[field], kb)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    conn.send({"baseline": baseline})
    split_baseline = _status_kbs(*split)
    conn.recv()  # the senders are done
    stop.set()
    sampler.join()
    hwm = (_status_kb("VmHWM") or 0) * 1024 if hwm_reset else None
    conn.send({
        "baseline": baseline, "sampled_peak": peak[0], "hwm_peak": hwm, "end": _rss(),
        "max_held": server.max_held(), "held": server.held(),
        "split_above_baseline_mb": {field: (kb - split_baseline.get(field, 0)) / 1024 for field, kb in split.items()},
    })
    conn.close()


def _sender(tag: str, index: int, windows_per_thread: int, barrier, results) -> None:
    """One SDK process: 8 threads each make a window, wait for a place, send it, ``windows_per_thread`` times.
    It imports while the engine process starts, and connects once the parent has passed ``barrier``."""
    import numpy as np
    from apache_beam.utils import multi_process_shared  # noqa: F401 - imported before the clock starts

    from beam_captions.inference.serving import serve_by_reference
    from beam_captions.records import WindowRecord

    served, wrong = [0] * THREADS, [0] * THREADS
    barrier.wait()  # the engine process's server is up
    start = time.time()
    server = _shared(tag, None).acquire()

    def send(thread: int) -> None:
        rng = np.random.default_rng(1000 * index + thread)
        for i in range(windows_per_thread):
            number = thread * windows_per_thread + i
            frames = rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
            window = WindowRecord(
                clip_id=f"clip-{index}", source=f"mem://clip-{index}.mp4", window_index=number,
                start_frame=number * 256, end_frame=number * 256 + 255, start_s=number * 10.0,
                end_s=number * 10.0 + 10.0, frame_indices=tuple(range(FRAMES)), frames=frames,
            )
            del frames
            outcome = serve_by_reference(server, window, server.reserve())  # lent, or pickled (``SWITCH``)
            del window
            if outcome.caption == "c" and outcome.frames is None:
                served[thread] += 1
            else:
                wrong[thread] += 1

    threads = [threading.Thread(target=send, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put({"index": index, "served": sum(served), "wrong": sum(wrong), "start": start, "end": time.time()})


def _start(processes: list, env: Optional[dict[str, str]]) -> None:
    """Start ``processes`` with ``env`` added to their environment (a spawned child gets it as it is now)."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        for process in processes:
            process.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def one_run(bound: int, windows_per_thread: int, host_env: Optional[dict[str, str]] = None,
            sender_env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """A fresh engine process hosting the server at ``bound`` (``host_env`` added to its environment) and 4
    fresh SDK processes sending to it (``sender_env`` added to theirs); the engine process's memory figures
    and the windows/s."""
    context = multiprocessing.get_context("spawn")
    tag = f"beam-captions-p12-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parent_end, host_end = context.Pipe()
    barrier, results = context.Barrier(PROCESSES + 1), context.Queue()
    host = context.Process(target=_host, args=(tag, bound, host_end), name="p12-engine-process")
    senders = [
        context.Process(target=_sender, args=(tag, i, windows_per_thread, barrier, results), name=f"p12-sdk-{i}")
        for i in range(PROCESSES)
    ]
    _start([host], host_env)
    clock = time.perf_counter()
    try:
        _start(senders, sender_env)
        if not parent_end.poll(180):
            raise RuntimeError("the engine process did not start its server within 180 s")
        parent_end.recv()
        barrier.wait(timeout=180)  # the senders have imported; they connect and send
        start_s = time.perf_counter() - clock
        sent = [results.get(timeout=600) for _ in senders]
        for sender in senders:
            sender.join(30)
        parent_end.send("done")
        host_figures = parent_end.recv()
        host.join(30)
    finally:
        for process in [*senders, host]:
            if process.is_alive():
                process.terminate()
                process.join(5)
        for suffix in (".address", ".lock"):
            try:
                os.remove(os.path.join(tempfile.gettempdir(), tag + suffix))
            except OSError:
                pass
    windows = sum(s["served"] for s in sent)
    wall = max(s["end"] for s in sent) - min(s["start"] for s in sent)
    peak = host_figures["hwm_peak"] or host_figures["sampled_peak"]
    return {
        "bound": bound,
        "host_env": host_env or {},
        "sender_env": sender_env or {},
        "windows": windows,
        "wrong_outcomes": sum(s["wrong"] for s in sent),
        "expected_windows": PROCESSES * THREADS * windows_per_thread,
        "peak_above_baseline_mb": (peak - host_figures["baseline"]) / MB,
        "peak_source": "VmHWM" if host_figures["hwm_peak"] else "sampled",
        "sampled_peak_above_baseline_mb": (host_figures["sampled_peak"] - host_figures["baseline"]) / MB,
        "baseline_rss_mb": host_figures["baseline"] / MB,
        "end_rss_above_baseline_mb": (host_figures["end"] - host_figures["baseline"]) / MB,
        "sampled_peaks_above_baseline_mb": host_figures["split_above_baseline_mb"],
        "max_held": host_figures["max_held"],
        "held_at_end": host_figures["held"],
        "windows_per_s": windows / wall,
        "senders_wall_s": wall,
        "start_s": start_s,
    }


# glibc's malloc by default raises its mmap threshold to the size of the last large block freed (up to
# 32 MiB), so later ~19 MB receive buffers come from per-thread arenas and stay in RSS after they are freed.
# A fixed threshold keeps every block over 1 MiB its own mapping, given back on free: RSS then follows the
# windows actually held.
ALLOCATORS: dict[str, dict[str, str]] = {"default": {}, "fixed_mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def _measure(runs: list[dict[str, Any]], bound: int, windows_per_thread: int, host_env: dict[str, str],
             sender_env: Optional[dict[str, str]] = None):
    """A zero-argument run for ``interleaved``: its peak above baseline (MiB); each run's figures kept in ``runs``."""
    def go() -> float:
        result = one_run(bound, windows_per_thread, host_env, sender_env)
        if result["windows"] != result["expected_windows"] or result["wrong_outcomes"]:
            raise RuntimeError(f"bound {bound}, senders' {sender_env or {}}: {result['windows']} of "
                               f"{result['expected_windows']} windows served "
                               f"({result['wrong_outcomes']} wrong outcomes)")
        runs.append(result)
        return result["peak_above_baseline_mb"]

    return go


def _summary(ours: list[float], baseline: list[float], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "ours_mb": statistics.median(ours), "baseline_mb": statistics.median(baseline),
        "ratio": median_ratio(ours, baseline),
        "max_held": {name: [r["max_held"] for r in rs] for name, rs in runs.items()},
        "windows_per_s": {name: [round(r["windows_per_s"], 2) for r in rs] for name, rs in runs.items()},
        "runs": runs,
    }


def run(windows_per_thread: int = 2, repeats: int = 1) -> list[Figure]:
    """P12 (the bound per engine against a bound per process) and P12s (frames lent against pickled)."""
    figure = Figure(
        "P12",
        f"engine-process peak RSS above baseline, {PROCESSES} SDK processes x {THREADS} threads sharing it: "
        f"bound per engine {BOUND} / per-process bound ({PROCESSES} x {BOUND})",
        "MiB", ("<=", 0.5),
    )
    details: dict[str, Any] = {
        "processes": PROCESSES, "threads_per_process": THREADS, "windows_per_thread": windows_per_thread,
        "window_mb": FRAMES * HEIGHT * WIDTH * 3 / MB, "frames": [FRAMES, HEIGHT, WIDTH, 3], "hold_s": HOLD_S,
        "repeats": repeats, "bounds": {"per_engine": BOUND, "per_process_equivalent": PROCESSES * BOUND},
    }
    for allocator, env in ALLOCATORS.items():
        runs: dict[str, list[dict[str, Any]]] = {"per_engine": [], "per_process_equivalent": []}
        ours, baseline = interleaved(
            repeats, _measure(runs["per_engine"], BOUND, windows_per_thread, env),
            _measure(runs["per_process_equivalent"], PROCESSES * BOUND, windows_per_thread, env))
        details[allocator] = {"host_env": env, **_summary(ours, baseline, runs)}
    primary = details["default"]
    figure.ours, figure.baseline, figure.ratio = primary["ours_mb"], primary["baseline_mb"], primary["ratio"]
    figure.details = details

    lent = Figure(
        "P12s",
        f"engine-process peak RSS above baseline, bound {BOUND}, {PROCESSES} x {THREADS} senders: frames lent "
        "through shared memory / pickled through the proxy",
        "MiB", ("", 0.0),
    )
    runs = {"shared_memory": [], "pickled": []}
    ours, baseline = interleaved(repeats, _measure(runs["shared_memory"], BOUND, windows_per_thread, {}),
                                 _measure(runs["pickled"], BOUND, windows_per_thread, {}, {SWITCH: "0"}))
    summary = _summary(ours, baseline, runs)
    lent.ours, lent.baseline, lent.ratio = summary["ours_mb"], summary["baseline_mb"], summary["ratio"]
    rates = {name: statistics.median(r["windows_per_s"] for r in rs) for name, rs in runs.items()}
    lent.details = {
        **{k: v for k, v in details.items() if k not in ALLOCATORS}, **summary,
        "windows_per_s_ratio": rates["shared_memory"] / rates["pickled"],
        "sampled_peaks_above_baseline_mb": {
            name: [r["sampled_peaks_above_baseline_mb"] for r in rs] for name, rs in runs.items()},
    }
    return [figure, lent]
