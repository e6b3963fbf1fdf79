"""Every caption on its own window: a stand-in vLLM whose answer is a digest of what it received, and the check.

``StandInVLLM`` replaces ``vllm.AsyncLLMEngine`` and nothing else: windows reach it through the real serving
path (``ServeWindows`` -> ``WindowServer`` -> ``VideoCaptionHandler.infer_window`` -> ``caption_batch`` ->
``video_input`` -> ``Engine.generate``), through Beam's ``MultiProcessShared`` proxy when the model is shared
across processes. It answers each request with the digest of the frames and the rendered prompt in the
input dict it got, and injects faults (``Faults``): engine deaths (every request in flight on the engine
fails with vLLM's ``EngineDeadError``), starts that fail (the bundles waiting on them fail and are retried),
windows it refuses (chosen by their digest, so a refusal on the wrong window shows too) and, to prove the
check, answers crossed between two windows in flight. ``route`` serves many windows from many clips from
threads of several processes, bundle by bundle as a runner would (a failed bundle is retried whole), and
``check`` says which outcomes are not their own window's.

Used by tests/test_caption_routing.py (CI size) and benchmarks/p11_accounting.py (10,000 windows).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import Engine, EngineStartError, load_engine, release_engines
from beam_captions.records import WindowRecord
from beam_captions.transforms._inference import ServeWindows, _digest

__all__ = [
    "Faults", "Outcome", "Report", "StandInVLLM", "answer", "check", "crossed_keys", "expected_digest", "keys_of",
    "make_window", "own_digest", "refused", "render", "route", "serve_bundles", "window_digest",
]

Key = tuple[int, int]  # (clip, window index)
FRAMES, SIDE = 4, 16  # a window's frames: 4 of 16 x 16 RGB, random per window


def render(messages: list[dict]) -> str:
    """The stand-in tokenizer's chat template: the messages as they are, then the assistant's turn."""
    return json.dumps(messages, sort_keys=True) + "\n<assistant>"


def window_digest(frames: Any, prompt: str) -> str:
    """The digest of a video (its shape, dtype and pixels) and a rendered prompt."""
    frames = np.ascontiguousarray(np.asarray(frames))
    digest = hashlib.sha256(f"{frames.shape}|{frames.dtype}|".encode())
    digest.update(frames.tobytes())
    digest.update(prompt.encode())
    return digest.hexdigest()[:32]


def expected_digest(frames: Any, prompt_text: str) -> str:
    """What the stand-in must answer for a window with ``frames`` asked ``prompt_text`` (a Qwen-VL chat:
    one user turn, the video then the text), computed here without the handler's code."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt_text}]}]
    return window_digest(frames, render(messages))


def answer(digest: str) -> str:
    """The stand-in's caption for a request whose digest is ``digest``."""
    return f"a window whose digest is {digest}"


def refused(digest: str, percent: float) -> bool:
    """Whether the stand-in refuses the request of that digest (about ``percent`` % of them)."""
    return int(digest[:8], 16) % 10000 < percent * 100


@dataclass(frozen=True)
class Faults:
    """What the stand-in does besides answering. ``die_every``: the engine dies at every n-th request
    (all its requests in flight die with it); ``failed_starts``: the numbers of the starts that fail (the
    first start is 1); ``refuse_percent``: windows refused as too long; ``cross_at``: from that request on,
    the answers of the next two requests in flight on one engine are exchanged, once (0: never)."""

    die_every: int = 0
    failed_starts: tuple[int, ...] = ()
    refuse_percent: float = 0.0
    cross_at: int = 0
    max_delay_s: float = 0.003  # each answer waits up to this long, so windows finish out of order


class _Tokenizer:
    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        assert not tokenize and add_generation_prompt and not template_kwargs
        return render(messages)


class _DigestLLM:
    """One started engine: ``AsyncLLMEngine``'s ``generate``, ``get_tokenizer`` and ``shutdown``."""

    def __init__(self, vllm: "StandInVLLM"):
        self.vllm = vllm
        self.dead = False
        self._parked: Optional[tuple[str, asyncio.Future]] = None

    def get_tokenizer(self) -> _Tokenizer:
        return _Tokenizer()

    async def generate(self, prompt: dict, params: Any, request_id: str):
        from vllm.v1.engine.exceptions import EngineDeadError

        frames, _metadata = prompt["multi_modal_data"]["video"]
        digest = window_digest(frames, prompt["prompt"])
        faults = self.vllm.faults
        if self.dead:
            raise EngineDeadError()
        if refused(digest, faults.refuse_percent):
            raise ValueError(f"The decoder prompt (digest {digest}) is longer than the maximum model length")
        number = self.vllm.note("requests")
        await asyncio.sleep(random.random() * faults.max_delay_s)
        if faults.die_every and number % faults.die_every == 0 and not self.dead:
            self.dead = True
            self.vllm.note("deaths")
        if self.dead:  # this request, and every other one in flight on this engine
            raise EngineDeadError()
        text = answer(digest)
        if faults.cross_at and number >= faults.cross_at and self.vllm.crossed is None:
            text = await self._cross(digest, text)
        yield SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[0] * 12, finish_reason="stop")],
                              prompt_token_ids=[0] * (len(frames) * 4))

    async def _cross(self, digest: str, text: str) -> str:
        """The first request here waits for the next one, and each gets the other's answer."""
        if self._parked is None:
            waiting = asyncio.get_running_loop().create_future()
            self._parked = (digest, waiting)
            try:
                return await asyncio.wait_for(waiting, timeout=5)
            except asyncio.TimeoutError:
                self._parked = None
                return text
        other, waiting = self._parked
        self._parked = None
        self.vllm.crossed = (other, digest)
        waiting.set_result(text)
        return answer(other)

    def shutdown(self) -> None:
        self.dead = True


class StandInVLLM:
    """``vllm.AsyncLLMEngine`` replaced, while ``installed``, by engines that answer with digests (and faults)."""

    def __init__(self, faults: Faults = Faults()):
        self.faults = faults
        self.counts = {"starts": 0, "failed_starts": 0, "requests": 0, "deaths": 0}
        self.crossed: Optional[tuple[str, str]] = None  # the digests whose answers were exchanged
        self._lock = threading.Lock()

    def note(self, name: str) -> int:
        with self._lock:
            self.counts[name] += 1
            return self.counts[name]

    def from_engine_args(self, args: Any) -> _DigestLLM:
        if self.note("starts") in self.faults.failed_starts:
            self.note("failed_starts")
            raise RuntimeError("CUDA error: out of memory (injected)")
        return _DigestLLM(self)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StandInVLLM"]:
        import vllm

        saved = vllm.AsyncEngineArgs, vllm.AsyncLLMEngine.__dict__["from_engine_args"]
        vllm.AsyncEngineArgs = dict
        vllm.AsyncLLMEngine.from_engine_args = staticmethod(self.from_engine_args)
        try:
            yield self
        finally:
            vllm.AsyncEngineArgs = saved[0]
            vllm.AsyncLLMEngine.from_engine_args = saved[1]


def make_window(clip: int, index: int) -> WindowRecord:
    """Window ``index`` of clip ``clip``: its own random frames and its own prompt (chosen in preparation)."""
    rng = np.random.default_rng([clip, index])
    return WindowRecord(
        clip_id=f"clip-{clip:05d}", source=f"mem://clip-{clip:05d}.mp4", window_index=index,
        start_frame=index * 30, end_frame=index * 30 + 29, start_s=float(index), end_s=index + 1.0,
        frame_indices=tuple(range(FRAMES)), frames=rng.integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8),
        prompt=f"Describe window {index} of clip {clip}.", prompt_variant="custom",
    )


def own_digest(key: Key) -> str:
    """What the stand-in must answer for the window ``key``, from that window's own frames and prompt."""
    window = make_window(*key)
    return expected_digest(window.frames, window.prompt)


@dataclass(frozen=True)
class Outcome:
    """What came back for one window: its caption, or its failures as ``(error type, message)``."""

    key: Key
    caption: Optional[str]
    failures: tuple[tuple[str, str], ...]


def _outcome(record: WindowRecord) -> Outcome:
    key = (int(record.clip_id.split("-")[1]), record.window_index)
    return Outcome(key, record.caption, tuple((f.error_type, f.message) for f in record.failures))


def serve_bundles(handler: VideoCaptionHandler, bundles: Sequence[Sequence[Key]]) -> tuple[list[Outcome], int]:
    """Serve ``bundles`` of windows through ``ServeWindows`` as a runner would: a bundle that fails (its
    engine could not start) is retried whole on a new instance, its first outputs dropped. The outcomes of
    the bundles that succeeded, and the number of bundle retries."""
    outcomes: list[Outcome] = []
    retries = 0
    dofn: Optional[ServeWindows] = None
    try:
        for keys in bundles:
            for _attempt in range(10):
                if dofn is None:
                    dofn = ServeWindows(handler)
                    dofn.setup()
                dofn.start_bundle()
                try:
                    out = []
                    for key in keys:
                        out.extend(dofn.process(make_window(*key), timestamp=0, window=None))
                    out.extend(dofn.finish_bundle())
                except EngineStartError:
                    retries += 1
                    dofn.teardown()
                    dofn = None
                    continue
                outcomes.extend(_outcome(v.value) for v in out)
                break
            else:
                raise RuntimeError(f"a bundle failed 10 times: {keys[:3]}...")
    finally:
        if dofn is not None:
            dofn.teardown()
    return outcomes, retries


def _feed_process(handler: VideoCaptionHandler, shares: list[list[list[Key]]]) -> tuple[list[Outcome], int, int]:
    """One SDK process: a thread per share of bundles, all sending to the machine's one shared engine.
    Its outcomes, its bundle retries and its process id."""
    with ThreadPoolExecutor(len(shares)) as pool:
        results = list(pool.map(lambda share: serve_bundles(handler, share), shares))
    return [o for outcomes, _ in results for o in outcomes], sum(r for _, r in results), os.getpid()


@dataclass
class Report:
    """A routing run: what was sent, what came back, the check's findings and what the stand-in saw."""

    windows: int
    clips: int
    outcomes: list[Outcome]
    bundle_retries: int
    counts: dict[str, int]
    crossed: Optional[tuple[str, str]]
    peak_in_flight: int
    processes: int  # the SDK processes whose windows came back
    wall_s: float
    problems: dict[str, list] = field(default_factory=dict)


def check(outcomes: Sequence[Outcome], keys: Sequence[Key], refuse_percent: float) -> dict[str, list]:
    """What is wrong with ``outcomes``, by kind (all empty: every caption is its own window's).

    ``wrong``: a caption that is not the digest of its own window's frames and prompt, or a refusal that
    its own window would not get; ``missing`` / ``doubled``: windows with no or several outcomes;
    ``lost``: windows that failed for another reason (an engine that died again under the retry).
    """
    found: dict[Key, list[Outcome]] = {}
    for outcome in outcomes:
        found.setdefault(outcome.key, []).append(outcome)
    problems: dict[str, list] = {"wrong": [], "missing": [], "doubled": [], "lost": [],
                                 "unknown": sorted(set(found) - set(keys))}
    for key in keys:
        got = found.get(key, [])
        if len(got) != 1:
            problems["missing" if not got else "doubled"].append(key)
            continue
        (outcome,) = got
        digest = own_digest(key)
        if refused(digest, refuse_percent):  # its own refusal, naming its own digest
            right = outcome.caption is None and len(outcome.failures) == 1 and digest in outcome.failures[0][1]
        elif outcome.caption is not None:
            right = outcome.caption == answer(digest) and not outcome.failures
        else:
            right = [error for error, _ in outcome.failures] == ["EngineDied"]
            if right:
                problems["lost"].append(key)
        if not right:
            problems["wrong"].append(key)
    return problems


def keys_of(windows: int, clips: int) -> list[Key]:
    """``windows`` windows spread over ``clips`` clips (window indices 0.. per clip), clips interleaved."""
    return [(i % clips, i // clips) for i in range(windows)]


def route(windows: int, clips: int, faults: Faults, *, processes: int = 2, threads: int = 2,
          parent_threads: int = 2, bundle: int = 24, bound: int = 16, start_backoff_s: float = 0.2,
          deadline_s: float = 1800) -> Report:
    """Serve ``windows`` windows of ``clips`` clips to one engine shared across processes (Beam's
    ``MultiProcessShared``, hosted in this process, where the stand-in is installed): ``processes`` spawned
    SDK processes of ``threads`` feeding threads each, plus ``parent_threads`` here, each thread serving its
    own bundles of ``bundle`` windows; at most ``bound`` windows in flight to the engine; a start tried again
    after a failed one waits ``start_backoff_s`` (``Engine.START_BACKOFF_S``); the spawned processes must be done
    within ``deadline_s`` (one that died, say killed for memory, would leave its windows unserved). Then ``check``."""
    keys = keys_of(windows, clips)
    random.Random(windows).shuffle(keys)
    bundles = [keys[i:i + bundle] for i in range(0, len(keys), bundle)]
    feeders = processes * threads + parent_threads
    shares = [bundles[i::feeders] for i in range(feeders)]
    vllm = StandInVLLM(faults)
    model_dir = os.path.join(tempfile.gettempdir(), f"routing-{uuid.uuid4().hex[:12]}")
    handler = VideoCaptionHandler(model_dir, vllm_kwargs={"model": model_dir}, caption_batch_size=bound,
                                  share_across_processes=True, request_timeout_s=60)
    tag = f"beam-captions-{_digest(handler.server_key())}"
    started = time.perf_counter()
    saved_backoff = Engine.START_BACKOFF_S
    Engine.START_BACKOFF_S = start_backoff_s
    with vllm.installed():
        host = ServeWindows(handler)
        host.setup()  # this process hosts the shared server: the engine (and the stand-in) live here
        try:
            with contextlib.ExitStack() as stack:
                children = None
                if processes:
                    pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(processes))
                    children = pool.starmap_async(
                        _feed_process,
                        [(handler, shares[parent_threads + p * threads: parent_threads + (p + 1) * threads])
                         for p in range(processes)],
                    )
                here = _feed_process(handler, shares[:parent_threads]) if parent_threads else ([], 0, 0)
                results = [here, *(children.get(timeout=deadline_s) if children else [])]
            peak = host._server.max_held()
        finally:
            host.teardown()
            release_engines(only=load_engine(handler.settings))
            Engine.START_BACKOFF_S = saved_backoff
            for suffix in (".address", ".lock"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(tempfile.gettempdir(), tag + suffix))
    outcomes = [o for found, _, _ in results for o in found]
    report = Report(windows, clips, outcomes, sum(r for _, r, _ in results), dict(vllm.counts), vllm.crossed, peak,
                    len({pid for found, _, pid in results if found}), time.perf_counter() - started)
    report.problems = check(outcomes, keys, faults.refuse_percent)
    return report


def crossed_keys(report: Report) -> set[Key]:
    """The windows whose answers the stand-in exchanged (found by their digests)."""
    digests = set(report.crossed or ())
    return {o.key for o in report.outcomes if own_digest(o.key) in digests}
