"""``--captioning-performance-mode``: vLLM's ``performance_mode``, ``throughput`` by default on a GPU and not passed
without one (vLLM's own default, ``balanced``); the installed vLLM takes each value, and the real CPU engine
starts with the default."""

from __future__ import annotations

import typing

import pytest

from beam_captions.inference import engine as engine_module
from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.engine import PERFORMANCE_MODES, EngineSettings, llm_kwargs
from beam_captions.options import parse_args
from conftest import VLLM_KWARGS, caption_windows_kwargs


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_the_default_is_throughput_on_a_gpu_and_nothing_without_one(monkeypatch, gpu):
    monkeypatch.setattr(engine_module, "gpu_available", lambda: gpu)
    default = llm_kwargs(EngineSettings(model_dir="m"))
    assert default.get("performance_mode") == ("throughput" if gpu else None)
    assert ("performance_mode" in default) == gpu
    for mode in PERFORMANCE_MODES:  # a mode asked for is passed either way
        assert llm_kwargs(EngineSettings(model_dir="m", performance_mode=mode))["performance_mode"] == mode
    overridden = EngineSettings(model_dir="m", performance_mode="throughput", extra={"performance_mode": "balanced"})
    assert llm_kwargs(overridden)["performance_mode"] == "balanced"  # --vllm-kwargs has the last word


def test_an_unknown_mode_is_refused_up_front():
    with pytest.raises(ValueError, match="performance_mode must be one of balanced, interactivity, throughput"):
        VideoCaptionHandler("m", performance_mode="fastest")
    with pytest.raises(SystemExit) as exited:
        parse_args(["--input", "in", "--output", "out", "--captioning-performance-mode", "fastest"])
    assert exited.value.code == 2


def test_the_modes_are_the_installed_vllm_s_and_each_makes_an_engine_config(captioner_dir):
    """Every value the flag offers is one the installed vLLM takes (its config is built, no engine started);
    ``throughput`` doubles vLLM's sequences per step where no ``max_num_seqs`` is given."""
    from vllm import AsyncEngineArgs
    from vllm.config.vllm import PerformanceMode

    assert set(PERFORMANCE_MODES) == set(typing.get_args(PerformanceMode))
    seqs = {}
    for mode in (None, *PERFORMANCE_MODES):
        kwargs = llm_kwargs(VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, performance_mode=mode).settings)
        config = AsyncEngineArgs(**kwargs).create_engine_config()
        assert config.performance_mode == (mode or "balanced")
        seqs[mode] = config.scheduler_config.max_num_seqs
    assert seqs["throughput"] == 2 * seqs[None] == 2 * seqs["balanced"]


def test_the_flag_reaches_the_caption_handler(tmp_path, monkeypatch, captioner_dir):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--generate-captions",
            "--model-dir", captioner_dir, "--runner", "DataflowRunner"]
    assert parse_args(argv)[0].captioning_performance_mode is None
    config = parse_args([*argv, "--captioning-performance-mode", "interactivity"])[0]
    seen = caption_windows_kwargs(monkeypatch, config)
    assert seen["performance_mode"] == "interactivity"
    handler = VideoCaptionHandler(captioner_dir, performance_mode=seen["performance_mode"])
    assert llm_kwargs(handler.settings)["performance_mode"] == "interactivity"


def test_the_real_cpu_engine_starts_with_the_cpu_default(captioner_dir):
    """The session's engine (the settings every test shares): nothing passed, so vLLM runs ``balanced``."""
    handler = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS)
    assert "performance_mode" not in llm_kwargs(handler.settings)
    engine = handler.load_model().engine.start()
    assert engine._llm.vllm_config.performance_mode == "balanced"
