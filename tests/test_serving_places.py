"""An engine's places (issue 30, faults that stay small): a sender killed while it waits for a place does not keep
the place it is then handed, through a real ``MultiProcessShared`` as on a shared engine; a window served for as
long as it may legitimately take keeps its place; and the place time and the bundle timeout are that time."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import Engine, EngineDied
from beam_captions.inference.enhance_handler import QwenTextEnhanceHandler
from beam_captions.inference.serving import CLAIM_S
from beam_captions.records import WindowRecord
from beam_captions.transforms._inference import ServeWindows
from senders import wait_for_a_place


def window(index: int) -> WindowRecord:
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=index * 30,
        end_frame=index * 30 + 29, start_s=float(index), end_s=index + 1.0, frame_indices=(0, 1),
        frames=np.zeros((2, 8, 8, 3), np.uint8),
    )


_finish_serving = threading.Event()


def _serve_until_told(engine, batch, request):
    _finish_serving.wait(60)
    return [r.replace(frames=None, caption="c") for r in batch]


def _one_place_server():
    """The server a shared engine's process keeps (here: this one): a caption handler's, one place, default times."""
    return VideoCaptionHandler("unused-dead-sender", caption_batch_size=1, inference_fn=_serve_until_told).load_model()


def test_a_sender_killed_while_it_waits_for_a_place_does_not_keep_it(tmp_path):
    """A sender SIGKILLed inside ``reserve`` is still handed the place when it frees (its call is on the server's
    thread): the place is back within ``CLAIM_S`` (10 s), far within 30 s, not after the serving time (hours)."""
    from apache_beam.utils import multi_process_shared

    tag = f"beam-captions-test-dead-sender-{uuid.uuid4().hex[:12]}"
    shared = multi_process_shared.MultiProcessShared(_one_place_server, tag=tag, path=str(tmp_path), always_proxy=True)
    server = shared.acquire()
    serving = threading.Thread(target=server.serve, args=(window(0), server.reserve()), daemon=True)
    serving.start()  # the one place is in use
    context = multiprocessing.get_context("spawn")
    waiting = context.Event()
    sender = context.Process(target=wait_for_a_place, args=(tag, str(tmp_path), waiting), daemon=True)
    sender.start()
    assert waiting.wait(60)
    time.sleep(1)  # its reserve is waiting on the server
    os.kill(sender.pid, signal.SIGKILL)
    sender.join(10)
    _finish_serving.set()
    serving.join(10)  # the place is free: the dead sender's reserve gets it
    handed = time.monotonic()
    while server.held() == 0 and time.monotonic() - handed < 5:
        time.sleep(0.02)
    assert server.held() == 1  # the dead sender's waiting reserve got the place
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(server.reserve()), daemon=True)
    waiter.start()
    waiter.join(30)
    back_after = time.monotonic() - handed
    assert got, "the killed sender's place was not back within 30 s"
    assert CLAIM_S - 0.5 < back_after < CLAIM_S + 3
    server.release(got[0])
    assert server.held() == 0


def _three_slow_calls(engine, batch, request):
    """A window at its longest: three generate calls of nearly the request timeout each, the engine dying under
    the last one of the first attempt."""
    for call in range(3):
        time.sleep(0.25)
    if engine.generation == 0:
        raise EngineDied("the engine died", engine.generation)
    return [r.replace(frames=None, caption="c") for r in batch]


def test_a_window_served_as_long_as_it_may_legitimately_take_keeps_its_place(monkeypatch):
    """Request timeout 0.3 s, stage 2 and flagged retries on: a window may take 2 attempts x 3 calls x 0.3 s,
    plus starts. One that takes 1.5 s (6 calls of 0.25 s and a restart) keeps its place the whole time, though
    its place waited for its window only 0.2 s: another sender (a thread here, an SDK process on a shared
    engine) gets the one place only when it is done."""
    monkeypatch.setattr("beam_captions.inference.vllm_handler.ENGINE_STARTS_S", 0.5)  # starts here take no time
    monkeypatch.setattr(Engine, "START_BACKOFF_MAX_S", 0.0)

    def start(self):
        self._llm = SimpleNamespace(shutdown=lambda: None)
        self.generation += 1

    monkeypatch.setattr(Engine, "_start", start)
    handler = VideoCaptionHandler("stand-in-long-window", caption_batch_size=1, request_timeout_s=0.3,
                                  retry_flagged=True, generate_stage2_caption=True, inference_fn=_three_slow_calls)
    assert handler.window_time_limit_s() == pytest.approx(2 * 3 * 0.3 + 0.5)
    server = handler.load_model()
    server.claim_s = 0.2
    outcome = []
    began = time.monotonic()
    first = threading.Thread(target=lambda: outcome.append(server.serve(window(0), server.reserve())))
    first.start()
    time.sleep(0.05)
    server.release(server.reserve())  # the next sender
    waited = time.monotonic() - began
    first.join(10)
    assert outcome[0].caption == "c" and outcome[0].failures == ()
    assert waited >= 1.5 and server.max_held() == 1


def test_the_place_time_and_the_bundle_timeout_cover_every_call_of_every_attempt():
    """2 attempts x the generate calls of one (stage 1, a flagged retry, stage 2) x the request timeout, plus
    900 s of engine starts and the 300 s longest backoff; the place held while serving and the bundle's wait are
    that time. No request timeout: no limit."""
    plain = VideoCaptionHandler("unused-limits", request_timeout_s=1800)
    every_call = VideoCaptionHandler("unused-limits", request_timeout_s=1800, retry_flagged=True,
                                     generate_stage2_caption=True)
    enhancer = QwenTextEnhanceHandler("unused-limits-enhancer", request_timeout_s=1800)
    assert (plain.generate_calls, every_call.generate_calls, enhancer.generate_calls) == (1, 3, 1)
    assert plain.window_time_limit_s() == 2 * 1800 + 900 + 300
    assert every_call.window_time_limit_s() == 2 * 3 * 1800 + 900 + 300
    for handler in (plain, every_call, enhancer):
        assert ServeWindows(handler).bundle_timeout_s == handler.window_time_limit_s()
        assert handler.load_model().lease_s == handler.window_time_limit_s()
    unlimited = VideoCaptionHandler("unused-limits", request_timeout_s=None)
    assert unlimited.window_time_limit_s() is None and ServeWindows(unlimited).bundle_timeout_s is None
    assert unlimited.load_model().lease_s is None
