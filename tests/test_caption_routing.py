"""Every caption on its own window: a stand-in vLLM answers each request with the digest of the frames and
the prompt it received (``routing.StandInVLLM``), behind the real handler, engine and serving code, and each
caption that comes back (or is written) must be the digest of its own window. Under windows in flight from
threads of several processes (the shared engine), engine deaths and restarts, a start that fails (its
bundles retried), refused windows, and a swap of two windows' answers, which the check must catch.
P11 (benchmarks/p11_accounting.py) runs the same at 10,000 windows."""

from __future__ import annotations

import gc
import glob
import json
import os
import threading
from fractions import Fraction

import apache_beam as beam
import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import load_engine, release_engines
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms import CaptionWindows, PrepareWindows, WriteOutputs
from beam_captions.transforms import _inference
from beam_captions.transforms._inference import ServeWindows, machine_server
from routing import Faults, StandInVLLM, answer, check, crossed_keys, expected_digest, keys_of, refused, route


@pytest.mark.parametrize("cross", [False, True], ids=["own-answers", "two-answers-swapped"])
def test_every_caption_is_its_own_windows_across_processes_deaths_and_retried_bundles(cross):
    """The shared engine (``--share-model-across-processes``) fed by two threads here and two in a spawned
    SDK process. With the answers of two windows in flight swapped on purpose (a smaller run, threads only,
    no failed start: a bundle retried after the swap would serve its windows again), the check names exactly
    those two."""
    if cross:
        report = route(96, 12, Faults(die_every=41, refuse_percent=5, cross_at=60), processes=0, parent_threads=4)
        assert report.crossed is not None
        assert set(report.problems["wrong"]) == crossed_keys(report) and len(crossed_keys(report)) == 2
        return
    faults = Faults(die_every=41, failed_starts=(2,), refuse_percent=5)
    report = route(240, 24, faults, processes=1, threads=2, parent_threads=2)
    lost = report.problems.pop("lost")  # the engine died again under a window's retry: its own failure, rare
    assert report.problems == {"wrong": [], "missing": [], "doubled": [], "unknown": []} and len(lost) <= 2
    assert len(report.outcomes) == 240 and report.processes == 2
    assert report.counts["deaths"] >= 4 and report.counts["failed_starts"] == 1 and report.bundle_retries >= 1
    assert report.counts["starts"] >= report.counts["deaths"] + 1  # a restart for each death, one more for the failed start
    assert sum(o.caption is None for o in report.outcomes) >= 5  # the refused ones
    assert 2 <= report.peak_in_flight <= 16


def test_the_check_names_a_missing_a_doubled_and_a_wrong_window():
    from routing import Outcome, own_digest

    keys = keys_of(6, 2)
    outcomes = [Outcome(k, answer(own_digest(k)), ()) for k in keys if not refused(own_digest(k), 0)]
    assert check(outcomes, keys, 0) == {"wrong": [], "missing": [], "doubled": [], "lost": [], "unknown": []}
    broken = [outcomes[0], outcomes[0], Outcome(keys[2], outcomes[1].caption, ()), *outcomes[3:5]]
    problems = check(broken, keys, 0)
    assert problems["doubled"] == [keys[0]] and problems["missing"] == [keys[1], keys[5]]
    assert problems["wrong"] == [keys[2]]


def _shared_handler(tmp_path) -> VideoCaptionHandler:
    model_dir = str(tmp_path / "stand-in")  # a tag of its own: this process hosts the machine's server
    return VideoCaptionHandler(model_dir, vllm_kwargs={"model": model_dir}, share_across_processes=True)


def test_a_process_keeps_one_proxy_of_the_machine_s_server_and_never_releases_it(tmp_path, monkeypatch):
    """A dropped proxy's finalizer connects to the server; run by the garbage collector on the hosting process's
    accepting thread it waits for itself, and the machine's engine is unreachable (the routing test above hung so).
    Every ``ServeWindows`` of a process shares one proxy, and a failed bundle's instance releases nothing."""
    from multiprocessing import managers

    released = []
    original = managers.BaseProxy._decref
    monkeypatch.setattr(managers.BaseProxy, "_decref",
                        staticmethod(lambda *args: released.append(args[0]) or original(*args)))
    handler = _shared_handler(tmp_path)
    first, failed = ServeWindows(handler), ServeWindows(handler)
    first.setup()
    failed.setup()
    assert failed._server is first._server
    failed.cycle = failed  # as a failed bundle's instance: garbage the collector frees
    del failed
    gc.collect()
    assert released == [] and first._server.held() == 0


def test_a_kept_proxy_whose_server_is_gone_is_replaced(tmp_path, monkeypatch):
    handler = _shared_handler(tmp_path)
    live = machine_server(handler)

    class Gone:
        def held(self):
            raise ConnectionRefusedError("the hosting process died")

    tag = next(tag for tag, server in _inference._machine_servers.items() if server is live)
    monkeypatch.setitem(_inference._machine_servers, tag, Gone())
    again = machine_server(handler)
    assert not isinstance(again, Gone) and again.held() == 0 and machine_server(handler) is again


# The written output: real clips through PrepareWindows, the caption step and WriteOutputs on the DirectRunner.
CLIPS, CLIP_FRAMES, WINDOW = 24, 40, 8  # 5 windows of 8 frames per clip, 4 sampled frames each
PROMPT = "Describe this window."
_expected: dict[tuple[str, int], str] = {}
_expected_lock = threading.Lock()


def _noise_clip(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = Fraction(1, 8)
        for i in range(CLIP_FRAMES):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _note_expected(element):
    """The digest each window must come back with, from the frames preparation made for it."""
    if isinstance(element, WindowRecord):
        with _expected_lock:
            _expected[(element.clip_id, element.window_index)] = expected_digest(element.frames, PROMPT)
    return element


def test_every_written_caption_is_its_own_windows(tmp_path):
    """Windows of 24 clips served on two runner threads while the engine dies every 13th request, 10 % refused:
    each row's caption is the digest of that window's frames; each refused window has its own failure record."""
    sources = []
    for i in range(CLIPS):
        _noise_clip(str(tmp_path / f"clip-{i:02d}.mp4"), i)
        sources.append(str(tmp_path / f"clip-{i:02d}.mp4"))
    out, model_dir = str(tmp_path / "out"), str(tmp_path / "stand-in")
    handler = VideoCaptionHandler(model_dir, vllm_kwargs={"model": model_dir}, prompt_text=PROMPT, caption_batch_size=8)
    vllm = StandInVLLM(Faults(die_every=13, refuse_percent=10))
    _expected.clear()
    asked = {"captions": {"model": "stand-in"}}
    with vllm.installed():
        try:
            pipeline = beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "2",
                                                              "--direct_running_mode", "multi_threading"]))
            (
                pipeline
                | beam.Create([ClipRef.from_source(s) for s in sources])
                | PrepareWindows(window_size=WINDOW, remainder_threshold=4, sampling_fps=4.0, pixel_bounds=(256, 4096))
                | beam.Map(_note_expected)
                | CaptionWindows(handler)
                | WriteOutputs(out, asked=asked)
            )
            pipeline.run().wait_until_finish()
        finally:
            release_engines(only=load_engine(handler.settings))

    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    assert len(rows) == len(_expected) == CLIPS * CLIP_FRAMES // WINDOW
    failures = set()
    for path in glob.glob(os.path.join(out, "failures", "*.json")):
        with open(path) as handle:
            record = json.load(handle)
        failures.add((record["clip_id"], record["window_index"], record["message"]))
    captioned = refused_rows = 0
    for row in rows:
        digest = _expected[(row["clip_id"], row["window_index"])]
        if refused(digest, 10):
            assert row["caption"] is None
            assert any((c, w) == (row["clip_id"], row["window_index"]) and digest in m for c, w, m in failures)
            refused_rows += 1
        else:
            assert row["caption"] == answer(digest), (row["clip_id"], row["window_index"])
            captioned += 1
    assert len(failures) == refused_rows >= 3 and captioned >= 80
    assert vllm.counts["deaths"] >= 3
