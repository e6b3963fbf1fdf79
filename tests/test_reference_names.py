"""The reference's names for people who port a pipeline (issue 15, section 6)."""

from __future__ import annotations

import numpy as np
import pytest

from beam_captions.inference.caption_handler import VideoCaptionHandler, frames_as, video_input
from beam_captions.io.paths import preview_path
from beam_captions.media.windowing import FrameWindow
from beam_captions.options import parse_args
from beam_captions.records import WindowRecord
from beam_captions.transforms.previews import GeneratePreviews, conform_preview, preview_window
from conftest import VLLM_KWARGS, caption_windows_kwargs, served


def window(frames: int = 4, size: int = 56) -> WindowRecord:
    rng = np.random.default_rng(0)
    return WindowRecord(
        clip_id="clip", source="mem://clip.mp4", window_index=0, start_frame=0, end_frame=29, start_s=0.0,
        end_s=1.0, frame_indices=tuple(range(frames)), frames=rng.integers(0, 255, (frames, size, size, 3), np.uint8),
    )


def test_preprocess_dtype_is_the_frames_dtype_and_the_compute_dtype_has_its_own_flag():
    config, _ = parse_args(["--input", "i", "--output", "o"])
    assert config.captioning_preprocess_dtype == "uint8" and config.captioning_dtype == "auto"
    config, _ = parse_args(["--input", "i", "--output", "o", "--captioning-preprocess-dtype", "float16"])
    assert config.captioning_preprocess_dtype == "float16" and config.captioning_dtype == "auto"
    config, _ = parse_args(["--input", "i", "--output", "o", "--captioning-dtype", "bfloat16"])
    assert config.captioning_dtype == "bfloat16" and config.captioning_preprocess_dtype == "uint8"


def test_the_pipeline_hands_each_dtype_to_its_place(monkeypatch, captioner_dir):
    config, _ = parse_args(["--input", "i", "--output", "o", "--generate-captions", "--model-dir", captioner_dir,
                            "--captioning-preprocess-dtype", "float16"])
    seen = caption_windows_kwargs(monkeypatch, config)
    assert seen["dtype"] == "auto" and seen["frames_dtype"] == "float16"  # not a float16 model


def test_frames_keep_their_values_in_the_asked_dtype():
    frames = window().frames
    assert frames_as(frames, "uint8") is frames
    assert frames_as(frames, "float16").dtype == np.float16 and np.array_equal(frames_as(frames, "float32"), frames)
    import torch

    assert frames_as(frames, "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError):
        frames_as(frames, "int8")
    handler = VideoCaptionHandler("unused", frames_dtype="float16", dtype="auto")
    assert handler.settings.dtype == "auto"


def test_a_float16_window_is_captioned_by_the_real_engine(captioner_dir):
    handler = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=4, frames_dtype="float16")
    engine = handler.load_model().engine
    frames, _ = video_input(engine, window(), "x", frames_dtype="float16")["multi_modal_data"]["video"]
    assert frames.dtype == np.float16
    (record, failure), = served(handler, [window()], engine)
    assert failure is None and record.caption


def test_transforms_take_the_reference_parameter_names(captioner_dir):
    from beam_captions.transforms import CaptionWindows, EnhanceCaptions, PrepareWindows

    assert CaptionWindows(model_dir=captioner_dir, model_batch_size=7, verbose=True).handler.batch_size == 7
    with pytest.raises(TypeError, match="no_such_name"):
        CaptionWindows(model_dir=captioner_dir, no_such_name=1)
    enhance = EnhanceCaptions(model_dir=captioner_dir, model_batch_size=9, verbose=True)
    assert enhance.handler.batch_size == 9
    PrepareWindows(verbose=True, pixel_bounds=(100, 1000))
    previews = GeneratePreviews(target_fps=2.0, target_height=16, verbose=True)
    assert previews.options["target_fps"] == 2.0 and previews.options["target_height"] == 16


def test_previews_follow_target_fps_and_height_given_to_generate_previews():
    frames = np.zeros((8, 48, 64, 3), np.uint8)
    thinned, fps = conform_preview(frames, 8.0, 2.0, 24)
    assert thinned.shape == (2, 24, 32, 3) and fps == pytest.approx(2.0)
    same, fps = conform_preview(frames, 1.0, 2.0, None)  # a higher rate than prepared: left as it is
    assert same.shape == frames.shape and fps == 1.0
    record = window().replace(preview_frames=frames, preview_fps=8.0)
    (out,) = list(preview_window(record, quality=50, compression_level=0, threads=1, target_fps=2.0, target_height=24))
    assert out.preview_webp[:4] == b"RIFF"


def test_preview_path_takes_a_window():
    expected = "out/previews/c/30_59.webp"
    assert preview_path("out", "c", 30, 59) == expected
    assert preview_path("out", "c", (30, 59)) == expected
    assert preview_path("out", "c", FrameWindow(1, 30, 59)) == expected
    assert preview_path("out", "c", window().replace(start_frame=30, end_frame=59)) == expected


@pytest.mark.parametrize("step, arguments", [
    ("CaptionWindows", ()), ("EnhanceCaptions", ()), ("PrepareWindows", ()), ("GeneratePreviews", ()),
    ("ReadClips", ("clips/",)), ("WriteOutputs", ("out/",)), ("CompactCaptions", ("out/",)),
])
def test_a_misspelt_keyword_is_named_as_unexpected_as_python_does(step, arguments):
    import beam_captions.transforms as transforms

    with pytest.raises(TypeError, match=rf"^{step}\.__init__\(\) got an unexpected keyword argument 'model_dirr'$"):
        getattr(transforms, step)(*arguments, model_dirr="models/captioner")


def test_a_handler_names_a_misspelt_keyword_as_python_does():
    from beam_captions.inference.enhance_handler import QwenTextEnhanceHandler

    unexpected = r"\.__init__\(\) got an unexpected keyword argument "
    with pytest.raises(TypeError, match=rf"^VideoCaptionHandler{unexpected}'batchsize'$"):
        VideoCaptionHandler("m", batchsize=3, model_batch_size=2)
    with pytest.raises(TypeError, match=rf"^QwenTextEnhanceHandler{unexpected}'preprocess_dtype'$"):
        QwenTextEnhanceHandler("m", preprocess_dtype="uint8")  # the caption stage's name, not the enhancer's
