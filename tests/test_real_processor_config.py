"""1080p and 4K windows on a tiny captioner carrying Qwen2.5-VL-7B-Instruct's real processor config.

That checkpoint states only image bounds (up to 12.8 Mpx a frame), so frames sized by it go
through unscaled: an 8-frame 4K window is 42k prompt tokens, past the job's max_model_len of
32768. Sized as the reference sizes them, every window costs at most 768 tokens a frame pair.
"""

from __future__ import annotations

from pathlib import Path

from clips import make_clip

from beam_captions.inference.caption_handler import VideoCaptionHandler, video_input
from beam_captions.inference.engine import release_engines
from beam_captions.tiny_models import with_real_processor_config
from beam_captions.prompts import caption_prompt
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms.prepare import PrepareWindows, prepare_clip
from conftest import VLLM_KWARGS, served

LONG_CONTEXT = {**VLLM_KWARGS, "max_model_len": 32768, "max_num_batched_tokens": 32768}  # the job's default
# qwen-vl-utils' smart_resize of 1920x1080 and 3840x2160 to at most 768 x 28 x 28 pixels: 36 x 20 patches
REFERENCE_SIZE = (1008, 560)


def test_1080p_and_4k_windows_cost_what_the_reference_spends(tmp_path: Path, tiny_models, capfd, caplog) -> None:
    real = with_real_processor_config(tiny_models["captioner"], str(tmp_path / "captioner-real"))
    config = PrepareWindows(model_dir=real).config
    records = []
    for name, width, height in (("1080p", 1920, 1080), ("4k", 3840, 2160)):
        clip = make_clip(str(tmp_path / f"{name}.mp4"), 8, 2.0, width, height, codec_options={"preset": "ultrafast"})
        records += [r for r in prepare_clip(ClipRef.from_source(clip), config) if isinstance(r, WindowRecord)]
    assert [r.frames.shape for r in records] == [(8, REFERENCE_SIZE[1], REFERENCE_SIZE[0], 3)] * 2

    handler = VideoCaptionHandler(real, vllm_kwargs=LONG_CONTEXT, max_output_tokens=8)
    engine = handler.load_model().engine
    try:
        text_tokens = len(engine.tokenizer.encode(video_input(engine, records[0], caption_prompt("default"))["prompt"]))
        results = served(handler, records, engine)
    finally:
        release_engines(engine)

    assert [failure for _, failure in results] == [None, None]  # the 4K window is captioned, not refused
    video_tokens = 4 * (REFERENCE_SIZE[0] // 28) * (REFERENCE_SIZE[1] // 28)  # 4 frame pairs
    for record, _ in results:
        assert record.caption
        assert record.caption_prompt_tokens == text_tokens - 1 + video_tokens  # the <|video_pad|> becomes the video
    out, err = capfd.readouterr()
    assert "does not apply the per-frame pixel cap" not in out + err + caplog.text  # transformers' warning, silenced
