import json

import pytest

from beam_captions.inference.engine import EngineSettings, llm_kwargs
from beam_captions.options import parse_args
from beam_captions.prompts import CAPTION_PROMPTS, ENHANCE_PROMPTS, caption_prompt, enhance_prompt, stage2_prompt


def test_every_variant_has_its_own_prompt():
    assert set(CAPTION_PROMPTS) == {"default", "av", "av-surveillance"}
    assert set(ENHANCE_PROMPTS) == {"default", "av", "av-surveillance"}
    assert len(set(CAPTION_PROMPTS.values())) == 3 and len(set(ENHANCE_PROMPTS.values())) == 3
    assert "surveillance" in caption_prompt("av-surveillance")


def test_custom_text_overrides_variant_and_unknown_variant_is_refused():
    assert caption_prompt("av", "Say what you see.") == "Say what you see."
    assert enhance_prompt("default", "Make it long.") == "Make it long."
    with pytest.raises(ValueError, match="unknown caption prompt variant 'nope'"):
        caption_prompt("nope")


def test_stage2_prompt_carries_instruction_and_caption():
    text = stage2_prompt("A dog runs.", "Fix this caption:\n")
    assert text == "Fix this caption:\nA dog runs."
    assert stage2_prompt("A dog runs.").endswith("A dog runs.")


def test_llm_kwargs_follow_the_reference_and_user_overrides_win():
    kwargs = llm_kwargs(EngineSettings("m", fp8=True, extra={"max_model_len": 4096, "enforce_eager": True}))
    assert kwargs["limit_mm_per_prompt"] == {"image": 0, "video": 1}
    assert kwargs["mm_processor_kwargs"] == {"cap_pixels_per_frame": True}
    assert kwargs["quantization"] == "fp8"
    assert kwargs["mm_processor_cache_gb"] == 0
    assert kwargs["gpu_memory_utilization"] == 0.85
    assert kwargs["max_model_len"] == 4096 and kwargs["enforce_eager"] is True
    assert "mm_processor_cache_gb" not in llm_kwargs(EngineSettings("m", disable_mmcache=False))
    assert "quantization" not in llm_kwargs(EngineSettings("m"))


def test_flags_have_the_reference_defaults_and_beam_flags_pass_through(tmp_path):
    config, rest = parse_args(["--input", "in", "--output", "out", "--runner", "DirectRunner"])
    assert rest == ["--runner", "DirectRunner"]
    assert (config.captioning_window_size, config.captioning_remainder_threshold) == (256, 128)
    assert (config.captioning_sampling_fps, config.captioning_batch_size, config.captioning_max_output_tokens) == (2.0, 64, 512)
    assert (config.preview_target_fps, config.preview_target_height) == (1.0, 240)
    assert (config.preview_compression_level, config.preview_quality, config.preview_num_cpus_per_worker) == (6, 50, 4)
    assert not config.captioning_use_vllm_mmcache and config.vllm_kwargs == {}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preview-quality", "101"], "--preview-quality must be between 0 and 100"),
        (["--preview-compression-level", "7"], "--preview-compression-level must be between 0 and 6"),
        (["--captioning-window-size", "0"], "--captioning-window-size must be at least 4"),
        (["--vllm-kwargs", "{oops"], "--vllm-kwargs is not valid JSON"),
        (["--vllm-kwargs", "[1]"], "--vllm-kwargs must be a JSON object"),
        (["--generate-captions"], "--model-dir is required"),
        (["--enhance-captions"], "--enhance-captions needs --generate-captions"),
        (["--captioning-gpu-memory-share", "1.5"], "--captioning-gpu-memory-share must be in (0, 1]"),
        (["--enhance-captions-vllm-kwargs", "3"], "--enhance-captions-vllm-kwargs must be a JSON object"),
        (["--generate-captions", "--model-dir", "/nowhere"], "is not a model directory"),
        (["--captioning-prompt-variant", "cats"], "invalid choice: 'cats'"),
    ],
)
def test_bad_values_give_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--input", "in", "--output", "out", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_vllm_kwargs_are_parsed_as_json():
    config, _ = parse_args(["--input", "i", "--output", "o", "--vllm-kwargs", json.dumps({"max_model_len": 2048})])
    assert config.vllm_kwargs == {"max_model_len": 2048}


def test_enhancement_flags_and_shared_gpu_budget(captioner_dir, tiny_models):
    config, _ = parse_args([
        "--input", "i", "--output", "o", "--generate-captions", "--model-dir", captioner_dir,
        "--enhance-captions", "--enhance-captions-model-dir", tiny_models["enhancer-qwen3"],
        "--enhance-captions-algorithm", "qwen3", "--enhance-captions-prompt-variant", "av",
    ])
    assert (config.enhance_captions_batch_size, config.enhance_captions_max_output_tokens) == (128, 512)
    assert config.enhance_captions_algorithm == "qwen3" and config.enhance_captions_prompt_variant == "av"
    with pytest.raises(SystemExit):
        parse_args([
            "--input", "i", "--output", "o", "--generate-captions", "--model-dir", captioner_dir, "--enhance-captions",
            "--enhance-captions-model-dir", tiny_models["enhancer"], "--captioning-gpu-memory-share", "0.6",
        ])


def test_streaming_watches_one_location():
    with pytest.raises(SystemExit):
        parse_args(["--input", "a/", "--input", "b/", "--output", "o", "--streaming"])
    config, _ = parse_args(["--input", "a/", "--output", "o", "--streaming"])
    assert config.streaming and config.input == ("a/",)


def test_prepare_windows_refuses_an_unknown_prompt_variant_naming_the_known_ones():
    from beam_captions.transforms import PrepareWindows

    with pytest.raises(ValueError, match="unknown caption prompt variant 'cats'; choose one of default, av, "
                                         "av-surveillance"):
        PrepareWindows(pixel_bounds=(100, 1000), prompt_variant="cats")
    assert PrepareWindows(pixel_bounds=(100, 1000), prompt_variant="av").prompt == ("av", CAPTION_PROMPTS["av"])
    assert PrepareWindows(pixel_bounds=(100, 1000), prompt_text="Say it.").prompt == ("custom", "Say it.")
    assert PrepareWindows(pixel_bounds=(100, 1000)).prompt is None


@pytest.mark.parametrize("own_variant", [None, "av"])
def test_the_prompt_chosen_in_preparation_reaches_the_engine_unless_the_caption_stage_has_its_own(
        own_variant, tmp_path, captioner_dir):
    """As in the reference, the prompt is given to the preparation stage; a caption stage given none of its
    own sends that text to the (real) engine, and one given its own sends its own."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to
    from clips import make_clip

    from beam_captions.inference.caption_handler import VideoCaptionHandler
    from beam_captions.records import ClipRef, WindowRecord
    from beam_captions.transforms import CaptionWindows, PrepareWindows
    from conftest import VLLM_KWARGS, spying_on

    text = "Name every colour in this clip."
    clip = ClipRef.from_source(str(make_clip(tmp_path / "clip.mp4", 8, 4.0, 64, 48)))  # one window of 4 model frames
    handler = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=2,
                                  prompt_variant=own_variant)
    with spying_on(handler.load_model().engine) as calls, beam.Pipeline() as pipeline:
        variants = (
            pipeline
            | beam.Create([clip])
            | PrepareWindows(window_size=8, remainder_threshold=4, model_dir=captioner_dir, prompt_text=text)
            | CaptionWindows(handler)
            | beam.Map(lambda e: (e.prompt_variant, bool(e.caption)) if isinstance(e, WindowRecord)
                       else type(e).__name__)
        )
        assert_that(variants, equal_to([(own_variant or "custom", True), "ClipInfo"]))
    (prompt,) = [i["prompt"] for inputs, _ in calls for i in inputs]
    assert (text in prompt) == (own_variant is None)
    assert (CAPTION_PROMPTS["av"] in prompt) == (own_variant == "av")
