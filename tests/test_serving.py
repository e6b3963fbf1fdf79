"""Serving windows to the engine: concurrent requests without a lock, windows in flight as they arrive and
bounded per engine, one start per engine generation, one restart per death, and timeouts for a hung engine."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input
from beam_captions.inference.engine import RENDERED_KEPT, Engine, EngineSettings, EngineStartError
from beam_captions.inference.serving import WindowServer, serve_async
from beam_captions.records import WindowRecord
from beam_captions.transforms._inference import ServeWindows
from beam_captions.transforms.caption import CaptionWindows
from conftest import VLLM_KWARGS


def window(index: int, frames: int = 4, size: int = 56) -> WindowRecord:
    rng = np.random.default_rng(1000 + index)
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=index * 30,
        end_frame=index * 30 + 29, start_s=float(index), end_s=index + 1.0, frame_indices=tuple(range(frames)),
        frames=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
    )


@pytest.fixture(scope="module")
def handler(captioner_dir):
    return VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS)


@pytest.fixture(scope="module")
def engine(handler):
    return handler.load_model().engine.start()


def test_a_short_request_is_not_held_behind_a_long_one(engine, handler):
    """No lock around generation: a request sent while another runs finishes first if it is shorter."""
    from vllm import SamplingParams

    long_params = SamplingParams(max_tokens=1500, ignore_eos=True, temperature=0)
    short_params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)
    finished: dict[str, float] = {}

    def run(name, record, params):
        engine.generate([video_input(engine, record, handler.request.prompt)], params)
        finished[name] = time.perf_counter()

    long = threading.Thread(target=run, args=("long", window(0), long_params))
    long.start()
    time.sleep(0.5)  # the long request is being generated
    run("short", window(1), short_params)
    long.join()
    assert finished["short"] < finished["long"]


def test_a_chat_is_rendered_once_for_every_window_that_sends_it_and_the_kept_texts_are_bounded(engine, monkeypatch):
    """render_chat keeps the chat template's text per messages (the same for a stage's windows), up to
    ``RENDERED_KEPT`` of them (stage 2's prompts differ per window)."""
    tokenizer = engine.tokenizer
    engine._rendered.clear()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe it."}]}]
    first = engine.render_chat(messages)
    assert first == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def no_more_rendering(self):
        raise AssertionError("the template was rendered again")

    monkeypatch.setattr(Engine, "tokenizer", property(no_more_rendering))
    assert engine.render_chat(messages) == first
    other = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Name the colours."}]}]
    with pytest.raises(AssertionError, match="rendered again"):
        engine.render_chat(other)  # other messages are rendered, not served from the kept text
    monkeypatch.undo()
    for i in range(RENDERED_KEPT + 5):
        engine.render_chat([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": f"Caption {i}."}]}])
    assert 0 < len(engine._rendered) <= RENDERED_KEPT


def test_tiny_captions_end_at_varied_lengths(engine, handler):
    """The tiny model stops where a real one might, so batching effects show on the CPU."""
    request = handler.request
    outputs = engine.generate([video_input(engine, window(i), request.prompt) for i in range(16)],
                              request.sampling_params())
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    reasons = {o.outputs[0].finish_reason for o in outputs}
    assert "stop" in reasons
    assert len(set(lengths)) >= 4 and min(lengths) < max(lengths) // 2



# Fault injection: model calls that take a while and count how many windows are alive at once.
_alive = {"made": 0, "served": 0, "peak_alive": 0, "now": 0, "peak_in_flight": 0}
_alive_lock = threading.Lock()


def _made(index: int) -> WindowRecord:
    with _alive_lock:
        _alive["made"] += 1
    return window(index)


def _slow_caption(engine, batch, request):
    with _alive_lock:
        _alive["now"] += 1
        _alive["peak_in_flight"] = max(_alive["peak_in_flight"], _alive["now"])
        _alive["peak_alive"] = max(_alive["peak_alive"], _alive["made"] - _alive["served"])
    time.sleep(0.15)
    with _alive_lock:
        _alive["now"] -= 1
        _alive["served"] += 1
    if batch[0].window_index == 3:
        raise RuntimeError("CUDA error: device-side assert")
    return [r.replace(frames=None, caption=f"c{r.window_index}") for r in batch]


def test_windows_are_in_flight_together_bounded_and_push_back_on_the_upstream():
    """ServeWindows sends each window as it arrives, never more than the bound at once, and the step
    upstream waits meanwhile: windows made but not yet served never exceed the bound (+1 being handed over)."""
    handler = VideoCaptionHandler("unused-bounded", caption_batch_size=4, inference_fn=_slow_caption)
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(list(range(12)) + [-1], reshuffle=False)
            | beam.Map(lambda i: _made(i) if i >= 0 else "not a window")
            | CaptionWindows(handler)
            | beam.Map(lambda e: (e.caption, e.window_index, [f.stage for f in e.failures])
                       if isinstance(e, WindowRecord) else e)
        )
        expected = [(f"c{i}", i, []) for i in range(12) if i != 3] + [(None, 3, ["caption"]), "not a window"]
        assert_that(out, equal_to(expected))
    assert 2 <= _alive["peak_in_flight"] <= 4
    assert _alive["peak_alive"] <= 5, _alive


_serving_threads: list[threading.Thread] = []


def _caption_noting_the_thread(engine, batch, request):
    _serving_threads.append(threading.current_thread())
    time.sleep(0.02)
    return [r.replace(frames=None, caption="c") for r in batch]


def test_step_instances_of_one_handler_share_the_process_s_serving_threads():
    """A new ``ServeWindows`` instance (a new bundle processor, a new pipeline in the same worker) serves on the
    threads the earlier ones started, and its teardown leaves them to the others; a pool per instance started
    ``batch_size`` new threads each time, every start a wait on the step's thread."""
    handler = VideoCaptionHandler("unused-pool", caption_batch_size=8, inference_fn=_caption_noting_the_thread)
    _serving_threads.clear()
    for _ in range(3):
        outcomes = _drive(ServeWindows(handler), [window(i) for i in range(8)])
        assert [o.caption for o in outcomes] == ["c"] * 8
    assert len(_serving_threads) == 24
    assert len(set(_serving_threads)) <= 8


def _drive(dofn: ServeWindows, elements) -> list:
    """Run one bundle through a ``ServeWindows`` instance by hand, as a runner would."""
    out = []
    dofn.setup()
    dofn.start_bundle()
    try:
        for element in elements:
            out.extend(dofn.process(element, timestamp=0, window=None))
        out.extend(dofn.finish_bundle())
    finally:
        dofn.teardown()
    return [value.value if hasattr(value, "value") else value for value in out]


def _engine_that_cannot_start(monkeypatch, seconds: float = 0.3) -> list:
    attempts = []

    def failing_start(self):
        attempts.append(time.monotonic())
        time.sleep(seconds)
        raise OSError("no GPU memory left for the weights")

    monkeypatch.setattr(Engine, "_start", failing_start)
    monkeypatch.setattr(Engine, "START_BACKOFF_S", 0.0)  # the runner's retry tries again at once (backoff: test_engine_restarts)
    return attempts


def test_an_engine_that_cannot_start_is_tried_once_for_64_windows_in_flight(monkeypatch):
    """Every window waiting on the failed start gets its error at once: one load attempt, the bundle fails
    in about one load time, and the runner's retry of the bundle tries once more."""
    attempts = _engine_that_cannot_start(monkeypatch)
    handler = VideoCaptionHandler("never-starts", caption_batch_size=64)
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="no GPU memory left"):
        _drive(ServeWindows(handler), [window(i) for i in range(64)])
    assert len(attempts) == 1 and time.monotonic() - started < 5
    with pytest.raises(EngineStartError):  # the runner retries the bundle: one more attempt
        _drive(ServeWindows(handler), [window(i) for i in range(8)])
    assert len(attempts) == 2


def test_a_failing_start_also_fails_run_inference_once(monkeypatch):
    attempts = _engine_that_cannot_start(monkeypatch, 0.1)
    handler = VideoCaptionHandler("never-starts-either", caption_batch_size=16)
    with pytest.raises(EngineStartError):
        list(handler.run_inference([window(i) for i in range(16)], handler.load_model()))
    assert len(attempts) == 1


def _fake_vllm(monkeypatch, behaviours: list[str]) -> list:
    """``AsyncLLMEngine`` stand-ins, one per start, each behaving as the next of ``behaviours``:
    ``answer``, ``die`` (the first request raises EngineDeadError after 0.2 s; others keep running),
    ``hang`` (never answers)."""
    import vllm
    from vllm.v1.engine.exceptions import EngineDeadError

    built = []

    class FakeAsync:
        def __init__(self):
            self.behaviour = behaviours[min(len(built), len(behaviours) - 1)]
            self.requests = 0
            built.append(self)

        async def generate(self, prompt, params, request_id):
            self.requests += 1
            if self.behaviour == "hang":
                await asyncio.sleep(3600)
            if self.behaviour == "die":
                if self.requests == 1:
                    await asyncio.sleep(0.2)
                    raise EngineDeadError()
                await asyncio.sleep(3600)  # in flight when the engine is replaced
            await asyncio.sleep(0.05)
            yield SimpleNamespace(outputs=[SimpleNamespace(text="ok", token_ids=[1], finish_reason="stop")],
                                  prompt_token_ids=[1, 2])

        def shutdown(self):
            pass

    monkeypatch.setattr(vllm, "AsyncEngineArgs", dict)
    monkeypatch.setattr(vllm.AsyncLLMEngine, "from_engine_args", lambda args: FakeAsync())
    monkeypatch.setattr("beam_captions.inference.engine._final_only", lambda params: params)
    return built


def _ask(engine, batch, request):
    return [r.replace(frames=None, caption=engine.generate([{}], None)[0].outputs[0].text) for r in batch]


def test_a_restart_retries_the_requests_other_threads_had_in_flight(monkeypatch):
    """One request sees the engine die; the restart cancels the requests of three other threads: all four
    are retried on the new engine (none becomes a failure), and the engine is started once more, not four times."""
    built = _fake_vllm(monkeypatch, ["die", "answer"])
    engine = Engine(EngineSettings(model_dir="fake-model", extra={"model": "fake-model"}), request_timeout_s=30)
    handler = VideoCaptionHandler("fake-model", inference_fn=_ask)
    server = WindowServer(handler, engine, bound=8)
    try:
        engine.start()
        results = list(handler.run_inference([window(i) for i in range(4)], server))
    finally:
        engine.shutdown()
    assert len(built) == 2 and engine.generation == 2
    assert [(r.caption, r.failures) for r in results] == [("ok", ())] * 4


def test_a_hung_engine_is_restarted_and_the_window_retried_then_recorded_as_failed(monkeypatch):
    built = _fake_vllm(monkeypatch, ["hang", "answer", "hang"])
    engine = Engine(EngineSettings(model_dir="fake-hung", extra={"model": "fake-hung"}), request_timeout_s=0.5)
    handler = VideoCaptionHandler("fake-hung", inference_fn=_ask)
    try:
        (record,) = handler.run_inference([window(0)], WindowServer(handler, engine, bound=2))
        assert record.caption == "ok" and record.failures == () and len(built) == 2

        built[-1].behaviour = "hang"  # hangs again, and so does its replacement
        (record,) = handler.run_inference([window(1)], WindowServer(handler, engine, bound=2))
    finally:
        engine.shutdown()
    assert record.caption is None and len(built) == 3
    (failure,) = record.failures
    assert failure.stage == "caption" and failure.error_type == "EngineDied" and "hung" in failure.message


def test_a_request_cut_off_by_a_stop_is_not_retried_and_starts_no_engine(monkeypatch, caplog):
    """A stopping run closes the engine while a window is being served: the window is not retried (no
    "starting it again" warning after the stop line) and no new engine starts."""
    from beam_captions.inference.engine import EngineClosed

    built = _fake_vllm(monkeypatch, ["hang", "answer"])
    engine = Engine(EngineSettings(model_dir="fake-stop", extra={"model": "fake-stop"}), request_timeout_s=30)
    handler = VideoCaptionHandler("fake-stop", inference_fn=_ask)
    engine.start()
    threading.Timer(0.3, engine.close).start()  # the stop, while the request hangs
    started = time.monotonic()
    with caplog.at_level("WARNING"), pytest.raises(EngineClosed):
        handler.infer_window(engine, window(0))
    assert time.monotonic() - started < 10
    assert len(built) == 1 and engine.generation == 1
    assert not [r for r in caplog.records if "starting it again" in r.getMessage()]


def test_windows_reach_an_engine_shared_across_processes(captioner_dir, handler):
    """share_model_across_processes: ServeWindows talks to the engine through Beam's proxy."""
    shared = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, share_across_processes=True)
    assert shared.share_model_across_processes()
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create([window(i) for i in range(3)], reshuffle=False)
            | CaptionWindows(shared)
            | beam.Map(lambda r: (r.window_index, bool(r.caption), r.caption_model, r.frames is None, r.failures))
        )
        assert_that(out, equal_to([(i, True, "captioner", True, ()) for i in range(3)]))


def _sleepy(engine, batch, request):
    time.sleep(0.05)
    return [r.replace(frames=None, caption="c") for r in batch]


SHARED_BOUND = 3


def _shared_handler() -> VideoCaptionHandler:
    return VideoCaptionHandler("unused-shared", caption_batch_size=SHARED_BOUND, inference_fn=_sleepy,
                               share_across_processes=True)


def _feed_shared_engine(tag: str, windows: int) -> int:
    """One SDK process: 8 threads send windows to the machine's one server through its proxy."""
    from concurrent.futures import ThreadPoolExecutor

    from apache_beam.utils import multi_process_shared

    server = multi_process_shared.MultiProcessShared(_shared_handler().load_model, tag=tag, always_proxy=True).acquire()
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for i in range(windows):
            futures.append(serve_async(server, window(i, frames=2, size=8), pool))
        return sum(1 for future in futures if future.result().caption == "c")


def test_the_in_flight_bound_is_per_engine_across_processes(tmp_path):
    """Three SDK processes share one engine: together they never hold more than its bound of windows
    (a bound per process would let 3 x 8 threads in at once)."""
    from apache_beam.utils import multi_process_shared

    tag = f"beam-captions-test-bound-{tmp_path.name}"
    server = multi_process_shared.MultiProcessShared(_shared_handler().load_model, tag=tag, always_proxy=True).acquire()
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        served = pool.starmap(_feed_shared_engine, [(tag, 12)] * 3)
    assert served == [12, 12, 12]
    assert server.max_held() == SHARED_BOUND
    assert server.held() == 0


def test_a_place_held_by_a_caller_that_died_is_taken_back():
    server = WindowServer(VideoCaptionHandler("unused"), SimpleNamespace(name="m"), bound=1, lease_s=0.2)
    server.reserve()  # never served: its caller died
    started = time.monotonic()
    server.release(server.reserve())
    assert 0.15 < time.monotonic() - started < 2


def _stuck(engine, batch, request):
    time.sleep(3)
    return [r.replace(frames=None, caption="late") for r in batch]


def test_a_bundle_whose_windows_do_not_come_back_fails_in_bounded_time_and_gives_places_back(monkeypatch):
    """finish_bundle waits at most ``bundle_timeout_s``: then the bundle fails (the runner retries it), and
    the engine's places come back as the windows being served end."""
    monkeypatch.setattr(ServeWindows, "bundle_timeout_s", property(lambda self: 0.5))
    handler = VideoCaptionHandler("unused-stuck", caption_batch_size=4, inference_fn=_stuck)
    dofn = ServeWindows(handler)
    dofn.setup()
    dofn.start_bundle()
    for i in range(4):
        list(dofn.process(window(i), timestamp=0, window=None))
    server = dofn._server
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not back"):
        list(dofn.finish_bundle())
    assert time.monotonic() - started < 2.5
    time.sleep(3)  # the windows being served end on their own and give their places back
    assert server.held() == 0
    dofn.teardown()
