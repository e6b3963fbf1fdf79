"""An engine's starts and restarts under many windows (issue 30, faults that stay small): a restart that fails is
tried once per generation however many windows saw the death, a start tried again backs off, and a request is
sent under the start lock so that a restart never gets it wrong. Stand-in engines (no vLLM) inject the faults."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace

import numpy as np
import pytest

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import Engine, EngineClosed, EngineSettings, EngineStartError
from beam_captions.inference.serving import WindowServer, serve_async
from beam_captions.records import WindowRecord

IN_FLIGHT = 64


class EngineDeadError(Exception):
    """Named as vLLM's: ``is_engine_dead`` goes by the name."""


class StandInLLM:
    """An engine numbered by its start. ``answer``: each request answers ``engine N`` after ``delay_s``;
    ``die``: it dies under every request once ``IN_FLIGHT`` are in flight. Once shut down, a request finds it dead."""

    def __init__(self, number: int, behaviour: str, delay_s: float = 0.3):
        self.number, self.behaviour, self.delay_s = number, behaviour, delay_s
        self.requests = 0
        self.shut_down = False

    async def generate(self, prompt, params, request_id):
        self.requests += 1
        if self.shut_down:
            raise EngineDeadError(f"engine {self.number} was shut down")
        if self.behaviour == "die":
            while self.requests < IN_FLIGHT:
                await asyncio.sleep(0.01)
            raise EngineDeadError(f"engine {self.number} died")
        await asyncio.sleep(self.delay_s)
        answer = SimpleNamespace(text=f"engine {self.number}", token_ids=[1], finish_reason="stop")
        yield SimpleNamespace(outputs=[answer], prompt_token_ids=[1])

    def shutdown(self):
        self.shut_down = True


def stand_in_starts(monkeypatch, behaviours: list[str]) -> list:
    """``Engine._start`` replaced: the n-th start fails (``fail``) or serves a ``StandInLLM`` of the n-th
    behaviour (the last one repeats) on its own event loop. Returns what each start made."""
    started: list = []

    def start(self: Engine) -> None:
        behaviour = behaviours[min(len(started), len(behaviours) - 1)]
        if behaviour == "fail":
            started.append("fail")
            time.sleep(0.02)  # a start takes a while: the other windows' restarts would queue behind it
            raise OSError("CUDA error: out of memory")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        llm = StandInLLM(self.generation + 1, behaviour)
        started.append(llm)
        self._llm, self._loop, self._thread = llm, loop, thread
        self.generation += 1

    monkeypatch.setattr(Engine, "_start", start)
    monkeypatch.setattr("beam_captions.inference.engine._final_only", lambda params: params)
    return started


def stand_in_engine(name: str) -> Engine:
    return Engine(EngineSettings(model_dir=name, extra={"model": name}), request_timeout_s=30)


def window(index: int) -> WindowRecord:
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=index * 30,
        end_frame=index * 30 + 29, start_s=float(index), end_s=index + 1.0, frame_indices=(0, 1),
        frames=np.zeros((2, 8, 8, 3), np.uint8),
    )


def _ask(engine, batch, request):
    return [r.replace(frames=None, caption=engine.generate([{}], None)[0].outputs[0].text) for r in batch]


def test_a_restart_that_keeps_failing_is_tried_once_for_64_windows_that_saw_the_death(monkeypatch):
    """64 windows in flight see their engine die, and its restart fails: one start attempt for that death
    (not one per window, each under the start lock after the bundle had failed), and every window gets
    the restart's error at once."""
    started = stand_in_starts(monkeypatch, ["die", "fail"])
    engine = stand_in_engine("stand-in-storm")
    engine.START_BACKOFF_S = 0.0  # the guard here is the once per generation; the backoff has its own test
    handler = VideoCaptionHandler("stand-in-storm", caption_batch_size=IN_FLIGHT, inference_fn=_ask)
    server = WindowServer(handler, engine, bound=IN_FLIGHT)
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [serve_async(server, window(i), pool) for i in range(IN_FLIGHT)]
            wait(futures)
    finally:
        engine.shutdown()
    assert started[0].requests == IN_FLIGHT  # every window was in flight when the engine died
    errors = [future.exception() for future in futures]
    assert all(isinstance(error, EngineStartError) and "out of memory" in str(error) for error in errors), errors
    assert started[1:] == ["fail"] and engine.start_attempts == 2 and engine.generation == 1
    assert time.monotonic() - began < 10


def test_a_start_tried_again_backs_off_doubling_to_its_cap_and_a_close_ends_the_wait(monkeypatch):
    """Each retry of a failing start (a new bundle's) waits START_BACKOFF_S, doubling, at most START_BACKOFF_MAX_S;
    a start that works resets it (a restart after the next death is immediate); a close ends a wait at once."""
    stand_in_starts(monkeypatch, ["fail", "fail", "fail", "fail", "answer", "fail"])
    engine = stand_in_engine("stand-in-backoff")
    engine.START_BACKOFF_S, engine.START_BACKOFF_MAX_S = 0.2, 0.5
    waits = []
    for _ in range(4):  # waits 0, 0.2, 0.4, then 0.5 (0.8 capped)
        engine.allow_start()
        began = time.monotonic()
        with pytest.raises(EngineStartError):
            engine.start()
        waits.append(time.monotonic() - began)
    assert waits[0] < 0.15
    for took, expected in zip(waits[1:], (0.2, 0.4, 0.5)):
        assert expected - 0.03 <= took < expected + 0.3, waits
    engine.allow_start()
    began = time.monotonic()
    engine.start()  # works, after 0.5 s
    assert time.monotonic() - began >= 0.47 and engine.generation == 1
    engine.START_BACKOFF_S = engine.START_BACKOFF_MAX_S = 5.0  # what four failures in a row would wait now
    began = time.monotonic()
    with pytest.raises(EngineStartError):
        engine.restart(1)  # its engine died: a start right away (no failure in a row since it started), which fails
    assert time.monotonic() - began < 0.15
    engine.allow_start()
    threading.Timer(0.05, engine.close).start()
    began = time.monotonic()
    with pytest.raises(EngineClosed):
        engine.start()  # would wait 5 s: the close ends it
    assert time.monotonic() - began < 0.15
    assert engine.start_attempts == 6


def test_a_request_is_sent_under_the_start_lock_so_a_restart_in_between_cannot_misroute_it(monkeypatch):
    """A window's request is being sent (its inputs read) while another thread restarts the engine after the
    death of the same generation. Under the lock the request goes whole to one engine: the restart cancels it,
    the window is retried on the new engine, and the engine is started once more. Sent outside the lock, it
    goes to the old engine through the new one's loop (and its failure restarts the new engine), or to a
    closed loop (a failed window)."""
    started = stand_in_starts(monkeypatch, ["answer"])
    engine = stand_in_engine("stand-in-lock")
    reading, restarted = threading.Event(), threading.Event()

    class PausingInputs:
        """The first read of the inputs waits (at most 0.5 s) for a restart to come in between."""

        paused = False

        def __iter__(self):
            if not PausingInputs.paused:
                PausingInputs.paused = True
                reading.set()
                restarted.wait(0.5)
            return iter([{}])

    def ask(engine, batch, request):
        (output,) = engine.generate(PausingInputs(), None)
        return [r.replace(frames=None, caption=output.outputs[0].text) for r in batch]

    handler = VideoCaptionHandler("stand-in-lock", inference_fn=ask)
    outcome = []
    try:
        engine.start()
        sender = threading.Thread(target=lambda: outcome.append(handler.infer_window(engine, window(0))))
        sender.start()
        assert reading.wait(5)
        engine.restart(1)  # another window saw generation 1 die
        restarted.set()
        sender.join(10)
    finally:
        engine.shutdown()
    (record,) = outcome
    assert record.failures == () and record.caption in ("engine 1", "engine 2")
    assert len(started) == 2 and engine.generation == 2
