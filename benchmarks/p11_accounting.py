"""P11: a job of many one-window clips with faults injected into the model step accounts for every clip.

The real stages (SkipFinishedClips, PrepareWindows, CaptionWindows, WriteOutputs) on the DirectRunner over
``clips`` tiny synthetic clips; the model call (``inference_fn``) refuses about 5 % of the windows (a
permanent error) and finds its engine dead for about 2 % (retried once after a restart, then captioned).
Every clip must end with a metas file: ``done`` for the captioned ones, ``failed`` with a failure record
for the refused ones, none lost, none doubled, and the summary counters must match what is on disk.

P11r (``run_routing``; alone: ``python benchmarks/p11_accounting.py --routing-windows 10000``): every caption
on its own window. A stand-in vLLM engine answers each request with the digest of the frames and prompt it
received, behind the real handler, engine and serving code (tests/routing.py); ``windows`` windows of many
clips go to one engine shared across processes (Beam's ``MultiProcessShared``) from threads of three SDK
processes, while the engine dies every 97th request, one restart fails (its bundles are retried whole) and
5 % of the windows are refused. Each window's outcome must be its own: the digest of its own frames and
prompt, or its own refusal; none missing, none doubled.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from fractions import Fraction

import apache_beam as beam
import av
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.serving import WindowServer
from beam_captions.metrics import counters
from beam_captions.records import ClipRef
from beam_captions.transforms import CaptionWindows, PrepareWindows, WriteOutputs
from beam_captions.transforms.skip_finished import SkipFinishedClips
from common import REPO_DIR, RESULTS_DIR, Figure, captioner_dir, setup_env

FRAMES = 16


def _make_clip(path: str, seed: int) -> None:
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = Fraction(1, 8)
        for i in range(FRAMES):
            image = np.full((32, 32, 3), (seed * 7 + i * 3) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _fate(source: str) -> str:
    """``refused`` (about 5 %), ``dies`` (about 2 %: the engine dies under its first try), else ``ok``."""
    bucket = int(hashlib.sha256(source.encode()).hexdigest(), 16) % 100
    return "refused" if bucket < 5 else "dies" if bucket < 7 else "ok"


_deaths_seen: set[str] = set()
_deaths_lock = threading.Lock()


class _EngineDeadError(RuntimeError):
    """Named as vLLM's, which is how the handler recognises a dead engine."""


_EngineDeadError.__name__ = "EngineDeadError"


def _faulty_caption(engine, batch, request):
    record = batch[0]
    fate = _fate(record.source)
    if fate == "refused":
        raise ValueError("the prompt is longer than the model's context")
    if fate == "dies":
        with _deaths_lock:
            first = record.source not in _deaths_seen
            _deaths_seen.add(record.source)
        if first:
            raise _EngineDeadError("the engine process died")
    time.sleep(0.002)
    return [record.replace(frames=None, caption=f"caption of {os.path.basename(record.source)}", caption_model="fake")]


class _StandInEngine:
    name = "fake"
    generation = 1
    restarts = 0

    def restart(self, generation=None):
        _StandInEngine.restarts += 1
        return self

    def allow_start(self):
        pass


class _FaultyHandler(VideoCaptionHandler):
    def load_model(self) -> WindowServer:
        return WindowServer(self, _StandInEngine(), self.batch_size)


def run(clips: int, model_dir: str | None = None) -> Figure:
    figure = Figure("P11", f"clips accounted for (metas, failure records) / clips, {clips} clips with faults",
                    "clips", (">=", 1.0))
    model_dir = model_dir or captioner_dir()
    work = tempfile.mkdtemp(prefix="p11-")
    try:
        folder, out = os.path.join(work, "clips"), os.path.join(work, "out")
        os.makedirs(folder)
        sources = []
        for i in range(clips):
            path = os.path.join(folder, f"clip-{i:05d}.mp4")
            _make_clip(path, i)
            sources.append(os.path.realpath(path))
        asked = {"captions": {"model": "fake"}}
        _StandInEngine.restarts = 0
        start = time.perf_counter()
        pipeline = beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "2",
                                                          "--direct_running_mode", "multi_threading"]))
        (
            pipeline
            | beam.Create([ClipRef.from_source(s) for s in sources])
            | SkipFinishedClips(out, asked)
            | PrepareWindows(window_size=FRAMES, remainder_threshold=8, sampling_fps=4.0, model_dir=model_dir)
            | CaptionWindows(_FaultyHandler("fake", inference_fn=_faulty_caption, caption_batch_size=16))
            | WriteOutputs(out, asked=asked)
        )
        result = pipeline.run()
        result.wait_until_finish()
        wall = time.perf_counter() - start
        counts = counters(result)
        metas = {}
        for path in glob.glob(os.path.join(out, "metas", "*.json")):
            with open(path) as handle:
                meta = json.load(handle)
            metas[meta["source"]] = meta
        failure_files = glob.glob(os.path.join(out, "failures", "*.json"))
        expected_failed = {s for s in sources if _fate(s) == "refused"}
        failed = {s for s, m in metas.items() if m["status"] == "failed"}
        done = {s for s, m in metas.items() if m["status"] == "done"}
        accounted = len(done | failed) if failed == expected_failed and done == set(sources) - expected_failed else 0
        figure.ours, figure.baseline = float(accounted), float(clips)
        figure.ratio = accounted / clips
        figure.details = {
            "clips": clips, "metas": len(metas), "done": len(done), "failed": len(failed),
            "failed_expected": len(expected_failed), "failure_records": len(failure_files),
            "engine_deaths_injected": sum(1 for s in sources if _fate(s) == "dies"),
            "engine_restarts": _StandInEngine.restarts,
            "counters": {k: counts.get(k, 0) for k in ("clips", "windows", "captions", "failures_caption",
                                                      "duplicates_dropped")},
            "summary_matches_disk": (counts.get("clips") == len(metas)
                                     and counts.get("failures_caption", 0) == len(failure_files)
                                     and counts.get("captions") == len(done)),
            "wall_s": wall,
        }
        return figure
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_routing(windows: int) -> Figure:
    """P11r: windows whose outcome is their own / windows (see the module's docstring)."""
    sys.path.insert(0, os.path.join(REPO_DIR, "tests"))
    import routing

    figure = Figure("P11r", f"windows whose caption is their own frames' digest / windows, {windows} windows "
                    "with faults, 3 processes", "windows", (">=", 1.0))
    faults = routing.Faults(die_every=97, failed_starts=(2,), refuse_percent=5)
    report = routing.route(windows, max(1, windows // 20), faults, processes=2, threads=2, parent_threads=2)
    problems = report.problems
    not_own = len(problems["wrong"]) + len(problems["missing"]) + len(problems["doubled"])
    figure.ours, figure.baseline = float(windows - not_own), float(windows)
    figure.ratio = figure.ours / windows
    captioned = sum(o.caption is not None for o in report.outcomes)
    figure.details = {
        "windows": windows, "clips": report.clips, "outcomes": len(report.outcomes), "captioned": captioned,
        "refused": len(report.outcomes) - captioned - len(problems["lost"]),
        "problems": {kind: len(keys) for kind, keys in problems.items()},  # lost: the engine died under both tries
        "engine": report.counts, "bundle_retries": report.bundle_retries, "sdk_processes": report.processes,
        "peak_in_flight": report.peak_in_flight, "wall_s": round(report.wall_s, 1),
        "windows_per_s": round(windows / report.wall_s, 1),
    }
    return figure


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="P11r: every caption on its own window")
    parser.add_argument("--routing-windows", type=int, default=10000)
    args = parser.parse_args()
    setup_env()
    result = run_routing(args.routing_windows)
    print(json.dumps(result.to_json(), indent=2))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "p11_routing.json"), "w", encoding="utf-8") as handle:
        json.dump(result.to_json(), handle, indent=2)
