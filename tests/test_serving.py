"""Serving windows to the engine: concurrent requests without a lock, windows in flight as they arrive,
varied caption lengths, and one restart per engine death."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input
from beam_captions.inference.engine import Engine, EngineSettings
from beam_captions.records import Failure, WindowRecord
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
    return handler.load_model().start()


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


def test_tiny_captions_end_at_varied_lengths(engine, handler):
    """The tiny model stops where a real one might, so batching effects show on the CPU."""
    request = handler.request
    outputs = engine.generate([video_input(engine, window(i), request.prompt) for i in range(16)],
                              request.sampling_params())
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    reasons = {o.outputs[0].finish_reason for o in outputs}
    assert "stop" in reasons
    assert len(set(lengths)) >= 4 and min(lengths) < max(lengths) // 2


_in_flight = {"now": 0, "peak": 0}
_in_flight_lock = threading.Lock()


def _slow_caption(engine, batch, request):
    """Takes a while, counts how many calls overlap; window 3 fails (fault injection)."""
    with _in_flight_lock:
        _in_flight["now"] += 1
        _in_flight["peak"] = max(_in_flight["peak"], _in_flight["now"])
    time.sleep(0.2)
    with _in_flight_lock:
        _in_flight["now"] -= 1
    if batch[0].window_index == 3:
        raise RuntimeError("CUDA error: device-side assert")
    return [r.replace(frames=None, caption=f"c{r.window_index}") for r in batch]


class _NoEngineHandler(VideoCaptionHandler):
    def load_model(self):
        return SimpleNamespace(name="m", start=lambda: None)


def test_windows_are_in_flight_together_and_bounded():
    """ServeWindows sends each window as it arrives (several at once), never more than the bound."""
    handler = _NoEngineHandler("unused-bounded", caption_batch_size=4, inference_fn=_slow_caption)
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create([window(i) for i in range(12)] + ["not a window"], reshuffle=False)
            | CaptionWindows(handler=handler)
            | beam.Map(lambda e: ("failure", e.window_index) if isinstance(e, Failure)
                       else (e.caption, e.window_index) if isinstance(e, WindowRecord) else e)
        )
        expected = [(f"c{i}", i) for i in range(12) if i != 3] + [(None, 3), ("failure", 3), "not a window"]
        assert_that(out, equal_to(expected))
    assert 2 <= _in_flight["peak"] <= 4


def test_two_threads_that_see_one_death_restart_the_engine_once(monkeypatch):
    import vllm
    from vllm.v1.engine.exceptions import EngineDeadError

    built = []

    class FakeAsync:
        """Dies on its first requests (fault injection); a replacement answers."""

        def __init__(self):
            self.dead = not built
            built.append(self)

        async def generate(self, prompt, params, request_id):
            await __import__("asyncio").sleep(0.2)
            if self.dead:
                raise EngineDeadError()
            yield SimpleNamespace(outputs=[SimpleNamespace(text="ok", token_ids=[1], finish_reason="stop")],
                                  prompt_token_ids=[1, 2])

        def shutdown(self):
            pass

    monkeypatch.setattr(vllm, "AsyncEngineArgs", dict)
    monkeypatch.setattr(vllm.AsyncLLMEngine, "from_engine_args", lambda args: FakeAsync())
    engine = Engine(EngineSettings(model_dir="fake-model", extra={"model": "fake-model"}))
    handler = VideoCaptionHandler("fake-model", inference_fn=lambda e, batch, request: [
        r.replace(frames=None, caption=e.generate([{}], None)[0].outputs[0].text) for r in batch])
    monkeypatch.setattr("beam_captions.inference.engine._final_only", lambda params: params)
    engine.start()
    results = []
    threads = [threading.Thread(target=lambda i=i: results.extend(handler.outcomes([window(i)], engine)))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.shutdown()
    assert len(built) == 2 and engine.generation == 2
    assert [record.caption for record, failure in results] == ["ok", "ok"]


def test_windows_reach_an_engine_shared_across_processes(captioner_dir, handler):
    """share_model_across_processes: ServeWindows talks to the engine through Beam's proxy."""
    shared = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, share_across_processes=True)
    assert shared.share_model_across_processes()
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create([window(i) for i in range(3)], reshuffle=False)
            | CaptionWindows(handler=shared)
            | beam.Map(lambda r: (r.window_index, bool(r.caption), r.caption_model, r.frames is None))
        )
        assert_that(out, equal_to([(i, True, "captioner", True) for i in range(3)]))


def test_each_bound_is_its_own_for_one_engine():
    """Two steps on one engine with different in-flight bounds keep their own (the first does not win)."""
    from beam_captions.transforms._inference import _slots_for

    small, large = _slots_for("engine-x", 2), _slots_for("engine-x", 5)
    assert small is _slots_for("engine-x", 2) and small is not large
    assert [small.free.acquire(blocking=False) for _ in range(3)] == [True, True, False]
    assert all(large.free.acquire(blocking=False) for _ in range(5))
