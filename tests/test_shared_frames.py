"""Frames into a shared engine's process through shared memory (issue 30): the engine's side gets the sender's
frames whole, mapped rather than unpickled; what crosses Beam's proxy is small both ways; and no block is left in
/dev/shm after a window is served, fails, raises on the engine's side, times out, is cancelled, or its sender is
killed. A real ``MultiProcessShared`` server in a child process (the engine's process), serving a caption handler
whose model step is a stand-in that captions each window with the digest of the frames it received."""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

import numpy as np
import pytest

from beam_captions.inference import shared_frames
from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import EngineStartError
from beam_captions.inference.serving import CLAIM_S, WindowServer, serve_async
from beam_captions.records import WindowRecord
from beam_captions.transforms._inference import ServeWindows, _digest

BOUND = 4
SLOW_S = 1.5
SHAPE = (8, 120, 160, 3)  # 460,800 bytes of frames a window
SMALL = 16 * 1024  # a message that crosses the proxy without frames is far under this


def frames_digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames)).hexdigest()


def _owner(frames: np.ndarray) -> str:
    """What holds the memory of ``frames``: ``mmap`` for lent frames, ``bytes`` for an unpickled one."""
    base = frames
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return type(base).__name__


_held_on: list[np.ndarray] = []


def _digest_frames(engine, batch, request):
    """The stand-in model step: caption the window with its frames' digest and what holds them; its prompt
    says how it goes wrong (or that its outcome keeps its frames)."""
    (window,) = batch
    if window.prompt == "start fails":
        raise EngineStartError("the engine could not start")
    if window.prompt == "fails":
        raise ValueError("the model failed on this window")
    if window.prompt == "slow":
        time.sleep(SLOW_S)
    if window.prompt == "holds on":
        _held_on.append(window.frames)  # like a request that timed out, still holding its input
    caption = f"{frames_digest(window.frames)} {_owner(window.frames)}"
    return [window.replace(frames=window.frames if window.prompt == "keeps its frames" else None, caption=caption)]


def _handler(model_dir: str) -> VideoCaptionHandler:
    return VideoCaptionHandler(model_dir, caption_batch_size=BOUND, inference_fn=_digest_frames,
                               share_across_processes=True)


def _engine_side(model_dir: str) -> WindowServer:
    """Built in the engine's process (the server ``MultiProcessShared`` spawns)."""
    return _handler(model_dir).load_model()


def window(index: int, prompt: str = "") -> WindowRecord:
    rng = np.random.default_rng(index)
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=index, start_frame=index * 30,
        end_frame=index * 30 + 29, start_s=float(index), end_s=index + 1.0, frame_indices=tuple(range(SHAPE[0])),
        frames=rng.integers(0, 256, SHAPE, dtype=np.uint8), prompt=prompt or None,
    )


def blocks(pid: int | None = None) -> list[str]:
    """The blocks process ``pid`` (default: this one) has lent and not unlinked."""
    return glob.glob(os.path.join(shared_frames.SHM_DIR, shared_frames.block_prefix(pid) + "*"))


def wait_for_no_blocks(pid: int | None = None, within_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while blocks(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return blocks(pid)


@pytest.fixture(scope="module")
def engine_process():
    """(model_dir, proxy, tag): a caption handler's server in a child process, as ``ServeWindows`` finds it."""
    from apache_beam.utils import multi_process_shared

    model_dir = f"unused-shared-frames-{uuid.uuid4().hex[:12]}"
    tag = f"beam-captions-{_digest(_handler(model_dir).server_key())}"
    shared = multi_process_shared.MultiProcessShared(
        functools.partial(_engine_side, model_dir), tag=tag, always_proxy=True, spawn_process=True)
    server = shared.acquire()
    yield model_dir, server, tag
    try:
        shared.unsafe_hard_delete()  # the engine's process exits
    except (EOFError, ConnectionError):
        pass


@pytest.fixture
def crossing(monkeypatch) -> dict[str, list[int]]:
    """The size of every message this process sends and receives over a ``multiprocessing`` connection."""
    sizes: dict[str, list[int]] = {"sent": [], "received": []}
    send, receive = Connection._send_bytes, Connection._recv_bytes

    def sending(self, buffer):
        sizes["sent"].append(len(buffer))
        return send(self, buffer)

    def receiving(self, maxsize=None):
        buffer = receive(self, maxsize)
        sizes["received"].append(buffer.getbuffer().nbytes)
        return buffer

    monkeypatch.setattr(Connection, "_send_bytes", sending)
    monkeypatch.setattr(Connection, "_recv_bytes", receiving)
    return sizes


def test_frames_reach_the_engine_whole_mapped_and_unpickled(engine_process, crossing):
    """Each window's frames arrive as they were sent (digest), as a view of the block (not an unpickled copy);
    no message either way carries them; no block is left."""
    _, server, _ = engine_process
    sent = [window(i) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        outcomes = [future.result() for future in [serve_async(server, w, pool) for w in sent]]
    assert sent[0].frames.nbytes > 20 * SMALL
    assert max(crossing["sent"]) < SMALL and max(crossing["received"]) < SMALL
    assert [o.caption for o in outcomes] == [f"{frames_digest(w.frames)} mmap" for w in sent]
    assert all(o.frames is None and not o.failures for o in outcomes)
    assert not blocks()
    assert server.held() == 0


def test_an_outcome_that_keeps_its_frames_crosses_back_without_them(engine_process, crossing):
    """A handler that hands the window back with its frames: the reference goes back, the sender's frames return."""
    _, server, _ = engine_process
    sent = window(10, "keeps its frames")
    with ThreadPoolExecutor(1) as pool:
        outcome = serve_async(server, sent, pool).result()
    assert outcome.caption == f"{frames_digest(sent.frames)} mmap"
    assert outcome.frames is sent.frames
    assert max(crossing["received"]) < SMALL
    assert not blocks()


@pytest.mark.parametrize("prompt", ["fails", "start fails"])
def test_no_block_is_left_when_the_window_fails_or_the_engine_side_raises(engine_process, prompt):
    """A model error is the window's failure (its outcome without frames); an engine that cannot start raises
    through the proxy. Either way the block is gone, and so is the window's place."""
    _, server, _ = engine_process
    with ThreadPoolExecutor(1) as pool:
        future = serve_async(server, window(20, prompt), pool)
        if prompt == "start fails":
            with pytest.raises(EngineStartError):
                future.result()
        else:
            outcome = future.result()
            assert outcome.frames is None and [f.error_type for f in outcome.failures] == ["ValueError"]
    assert not blocks()
    assert server.held() == 0


def test_frames_still_held_on_the_engine_side_do_not_fail_the_window(engine_process):
    """The engine's side cannot unmap frames something still holds: they stay mapped until it lets go, the
    window is served all the same, and the sender's block is unlinked."""
    _, server, _ = engine_process
    sent = window(25, "holds on")
    with ThreadPoolExecutor(1) as pool:
        outcome = serve_async(server, sent, pool).result()
    assert outcome.caption == f"{frames_digest(sent.frames)} mmap" and not outcome.failures
    assert not blocks()


def test_no_block_is_left_after_a_bundle_times_out(engine_process, monkeypatch):
    """``ServeWindows`` gives up on windows not back in time; they end on the engine's side, then their blocks go."""
    model_dir, server, _ = engine_process
    monkeypatch.setattr(ServeWindows, "bundle_timeout_s", property(lambda self: 0.3))
    dofn = ServeWindows(_handler(model_dir))
    dofn.setup()  # finds the engine's process by the handler's tag
    dofn.start_bundle()
    for i in range(2):
        list(dofn.process(window(30 + i, "slow"), timestamp=0, window=None))
    with pytest.raises(TimeoutError, match="not back"):
        list(dofn.finish_bundle())
    assert len(blocks()) == 2  # still being served
    assert not wait_for_no_blocks(within_s=SLOW_S + 5)
    assert server.held() == 0
    dofn.teardown()


def test_a_cancelled_window_makes_no_block(engine_process):
    """A window still queued when its bundle fails is cancelled before it lends anything."""
    _, server, _ = engine_process
    with ThreadPoolExecutor(1) as pool:
        serving = serve_async(server, window(40, "slow"), pool)
        queued = serve_async(server, window(41), pool)
        assert queued.cancel()
        server.release(queued.ticket)
        time.sleep(0.3)
        assert len(blocks()) == 1  # the window being served, not the cancelled one
        serving.result()
    assert not blocks()
    assert server.held() == 0


_KILLED_SENDER = """
import sys, threading, time
import numpy as np
from apache_beam.utils import multi_process_shared
from beam_captions.inference.serving import serve_by_reference
from beam_captions.records import WindowRecord

def _not_built_here():
    raise AssertionError("the engine's process builds the server")

server = multi_process_shared.MultiProcessShared(_not_built_here, tag=sys.argv[1], always_proxy=True).acquire()
frames = np.ones((8, 120, 160, 3), np.uint8)
window = WindowRecord("clip", "mem://clip.mp4", 50, 0, 29, 0.0, 1.0, tuple(range(8)), frames=frames, prompt="slow")
threading.Thread(target=serve_by_reference, args=(server, window, server.reserve()), daemon=True).start()
print("sending", flush=True)
time.sleep(60)
"""


def test_a_sender_killed_mid_window_leaves_no_block(engine_process):
    """A sender SIGKILLed while its window is served: its resource tracker unlinks the block it lent."""
    _, server, tag = engine_process
    sender = subprocess.Popen([sys.executable, "-c", _KILLED_SENDER, tag], stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout.readline().strip() == "sending"
        deadline = time.monotonic() + 10
        while not blocks(sender.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert blocks(sender.pid), "the sender lent no block"
        time.sleep(0.3)  # its window is on the engine's side
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait(10)
        assert not wait_for_no_blocks(sender.pid, within_s=10)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
    deadline = time.monotonic() + CLAIM_S + SLOW_S + 2  # its window ends on the engine's side, its place comes back
    while server.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.held() == 0


def test_frames_are_pickled_where_no_block_can_be_made(engine_process, crossing, monkeypatch):
    """No room in /dev/shm (the allocation fails): the window goes pickled, served all the same, nothing left."""
    _, server, _ = engine_process

    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    sent = window(60)
    with ThreadPoolExecutor(1) as pool:
        outcome = serve_async(server, sent, pool).result()
    assert outcome.caption == f"{frames_digest(sent.frames)} bytes"  # an unpickled copy
    assert max(crossing["sent"]) > sent.frames.nbytes
    assert not blocks()


def test_the_switch_turns_shared_frames_off(engine_process, crossing, monkeypatch):
    """``BEAM_CAPTIONS_SHARED_FRAMES=0`` (benchmarks compare both): frames pickled through the proxy."""
    _, server, _ = engine_process
    monkeypatch.setenv(shared_frames.SWITCH, "0")
    sent = window(70)
    with ThreadPoolExecutor(1) as pool:
        outcome = serve_async(server, sent, pool).result()
    assert outcome.caption == f"{frames_digest(sent.frames)} bytes"  # an unpickled copy
    assert max(crossing["sent"]) > sent.frames.nbytes


def test_a_server_in_the_same_process_gets_the_frames_themselves():
    """Not through a proxy: the handler gets the sender's array itself, no block and no copy."""
    seen = []

    def record(engine, batch, request):
        seen.append(batch[0].frames)
        return [batch[0].replace(frames=None, caption="c")]

    handler = VideoCaptionHandler("unused-same-process", caption_batch_size=1, inference_fn=record)
    server = WindowServer(handler, engine=None, bound=1)
    sent = window(80)
    with ThreadPoolExecutor(1) as pool:
        assert serve_async(server, sent, pool).result().caption == "c"
    assert seen[0] is sent.frames


def test_the_engine_side_maps_only_lent_frames_blocks():
    """A reference that names anything but a block of lent frames is refused, not opened."""
    handler = VideoCaptionHandler("unused-names", caption_batch_size=1, inference_fn=_digest_frames)
    server = WindowServer(handler, engine=None, bound=1)
    forged = window(90).replace(frames=shared_frames.SharedFrames("../../etc/passwd", (1,), "|u1"))
    with pytest.raises(ValueError, match="not a block of lent frames"):
        server.serve(forged, server.reserve())
    assert server.held() == 0
