"""Every --captioning-algorithm: its flags, its download error, its memory check, its chat and frame sizes.

No engine starts here (the engines of both Nemotron families run in tests/test_nemotron_e2e.py).
"""

from __future__ import annotations

import os

import pytest

from beam_captions.inference import engine as engine_module
from beam_captions.inference import gpu_budget
from beam_captions.inference.caption_handler import VideoCaptionHandler, strip_reasoning, video_input
from beam_captions.inference.engine import check_engine_memory, llm_kwargs
from beam_captions.inference.frame_bounds import FrameBounds, NemotronFrameSize, model_frame_bounds
from beam_captions.inference.gpu_budget import MODEL_SPECS, check_share
from beam_captions.inference.model_source import PINNED_REVISIONS
from beam_captions.inference.variants import CAPTION_ALGORITHMS, CAPTION_MODELS, caption_model
from beam_captions.options import parse_args
from beam_captions.records import WindowRecord

NEMOTRON = ("nemotron", "nemotron-bf16", "nemotron-fp8", "nemotron-nvfp4", "nemotron-3-nano-omni")
GPU_80GB, GPU_24GB = 79.6, 22.0  # what CUDA reports for an 80 GB and a 24 GB card
HUB_IDS = {
    "qwen": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3": "Qwen/Qwen3-VL-8B-Instruct",
    "nemotron": "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16",
    "nemotron-bf16": "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16",
    "nemotron-fp8": "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-FP8",
    "nemotron-nvfp4": "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-NVFP4-QAD",
    "nemotron-3-nano-omni": "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16",
}


@pytest.fixture(scope="module")
def model_dir_of(tiny_models, nemotron_models):
    """The tiny checkpoint of a variant's family (the command line refuses another family's checkpoint)."""
    dirs = {"qwen2.5": tiny_models["captioner"], "qwen3": tiny_models["captioner-qwen3"],
            "nemotron-vl": nemotron_models["captioner-nemotron"],
            "nemotron-omni": nemotron_models["captioner-nemotron-omni"]}
    return lambda variant: dirs[caption_model(variant).family.name]


def error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--input", "in", "--output", "out", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err.strip()


def test_the_flag_takes_every_variant_of_the_issue_table():
    assert set(CAPTION_ALGORITHMS) == set(HUB_IDS)
    assert {name: caption_model(name).hub_id for name in HUB_IDS} == HUB_IDS == CAPTION_MODELS
    assert caption_model("nemotron") == caption_model("nemotron-bf16")
    assert [caption_model(n).precision for n in ("nemotron", "nemotron-fp8", "nemotron-nvfp4")] == ["bf16", "fp8", "nvfp4"]
    with pytest.raises(ValueError, match="unknown captioning model variant 'llava'"):
        caption_model("llava")


@pytest.mark.parametrize("variant", sorted(HUB_IDS))
def test_each_variant_parses_and_validates(variant, model_dir_of):
    config, _ = parse_args(["--input", "i", "--output", "o", "--generate-captions", "--model-dir", model_dir_of(variant),
                            "--captioning-algorithm", variant])
    assert config.captioning_algorithm == variant


@pytest.mark.parametrize("variant", sorted(HUB_IDS))
def test_each_variant_downloads_its_own_pinned_checkpoint_or_says_how(variant, tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    empty = str(tmp_path / "weights")
    err = error_line(["--generate-captions", "--model-dir", empty, "--captioning-algorithm", variant], capsys)
    hub_id = HUB_IDS[variant]
    assert f"hf download {hub_id} --revision {PINNED_REVISIONS[hub_id]} --local-dir {empty}" in err
    assert len(PINNED_REVISIONS[hub_id]) == 40


@pytest.mark.parametrize("variant, hint", [
    ("nemotron", "use --captioning-algorithm nemotron-fp8"),
    ("nemotron-bf16", "use --captioning-algorithm nemotron-fp8"),
    ("nemotron-nvfp4", "use --captioning-algorithm nemotron-fp8"),
    ("nemotron-fp8", "nemotron-fp8 is already fp8; drop --captioning-use-fp8-weights"),
    ("nemotron-3-nano-omni", "drop --captioning-use-fp8-weights"),
])
def test_fp8_flag_with_a_nemotron_variant_names_the_right_variant(variant, hint, captioner_dir, capsys):
    err = error_line(["--generate-captions", "--model-dir", captioner_dir, "--captioning-algorithm", variant,
                      "--captioning-use-fp8-weights"], capsys)
    assert f"--captioning-use-fp8-weights does not apply to --captioning-algorithm {variant}" in err and hint in err
    with pytest.raises(ValueError, match=hint):
        VideoCaptionHandler("unused", model_variant=variant, fp8=True)


@pytest.mark.parametrize("variant", ["qwen", "qwen3"])
def test_fp8_flag_still_quantizes_qwen(variant, model_dir_of):
    config, _ = parse_args(["--input", "i", "--output", "o", "--generate-captions", "--model-dir", model_dir_of(variant),
                            "--captioning-algorithm", variant, "--captioning-use-fp8-weights"])
    assert config.captioning_use_fp8_weights
    assert llm_kwargs(VideoCaptionHandler("m", model_variant=variant, fp8=True).settings)["quantization"] == "fp8"


# (variant, extra flags, GPU GiB, fits): weights + one 32k sequence within the share.
MEMORY_CASES = [
    *[(v, [], GPU_80GB, True) for v in sorted(HUB_IDS)],  # every variant alone on an 80 GB card
    ("nemotron", [], GPU_24GB, False),  # 24 GB of bf16 weights
    ("nemotron-fp8", [], GPU_24GB, True),
    ("nemotron-nvfp4", [], GPU_24GB, True),
    ("nemotron-3-nano-omni", [], GPU_24GB, False),
    ("qwen", [], GPU_24GB, True),  # fits, with a warning about activations (below)
    ("qwen", ["--captioning-use-fp8-weights"], GPU_24GB, True),
    ("nemotron-3-nano-omni", ["--captioning-gpu-memory-share", "0.35"], GPU_80GB, False),  # 60 GB of weights
    ("nemotron", ["--captioning-gpu-memory-share", "0.35"], GPU_80GB, True),
    ("nemotron-nvfp4", ["--captioning-gpu-memory-share", "0.2"], GPU_80GB, True),
    ("nemotron-fp8", ["--captioning-gpu-memory-share", "0.1"], GPU_80GB, False),
]


@pytest.mark.parametrize("variant, flags, gpu_gib, fits", MEMORY_CASES)
def test_the_memory_check_knows_each_checkpoint(variant, flags, gpu_gib, fits, model_dir_of, capsys):
    argv = ["--generate-captions", "--model-dir", model_dir_of(variant), "--captioning-algorithm", variant,
            "--gpu-memory-gib", str(gpu_gib), *flags]
    if fits:
        parse_args(["--input", "i", "--output", "o", *argv])
    else:
        err = error_line(argv, capsys)
        assert HUB_IDS[variant] in err and "GiB" in err and f"of {gpu_gib:.1f} GiB" in err


def test_the_memory_check_covers_the_enhancer_beside_the_captioner(model_dir_of, tiny_models, capsys):
    base = ["--generate-captions", "--enhance-captions",
            "--enhance-captions-model-dir", tiny_models["enhancer"], "--gpu-memory-gib", str(GPU_80GB)]
    parse_args(["--input", "i", "--output", "o", *base, "--captioning-algorithm", "nemotron",
                "--model-dir", model_dir_of("nemotron")])
    err = error_line([*base, "--captioning-algorithm", "nemotron-3-nano-omni",
                      "--model-dir", model_dir_of("nemotron-3-nano-omni")], capsys)
    assert "Nemotron-3-Nano-Omni" in err and "(0.35 of 79.6 GiB)" in err


def test_a_tight_fit_is_a_warning_not_a_refusal(captioner_dir, caplog):
    """Qwen2.5-VL-7B in bf16 on a 24 GB card (the L4 of the Dataflow examples): weights and a 32k sequence fit
    in 0.85 of it, the activation estimate on top may not; vLLM's profiling decides, so the job is not refused."""
    with caplog.at_level("WARNING", logger="beam_captions.inference.gpu_budget"):
        parse_args(["--input", "i", "--output", "o", "--generate-captions", "--model-dir", captioner_dir,
                    "--gpu-memory-gib", str(GPU_24GB)])
    (record,) = caplog.records
    assert "Qwen2.5-VL-7B-Instruct needs about 17.2 GiB" in record.getMessage() and "activations" in record.getMessage()


def test_weight_sizes_per_checkpoint():
    gb = {model_id: spec.weight_gib() * 2**30 / 1e9 for model_id, spec in MODEL_SPECS.items()}
    assert round(gb["nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16"]) == 24
    assert round(gb["nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-FP8"]) == 12
    assert round(gb["nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-NVFP4-QAD"]) == 7
    assert round(gb["nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16"]) == 60
    assert 16 <= gb["Qwen/Qwen2.5-VL-7B-Instruct"] <= 17 and 17 <= gb["Qwen/Qwen3-VL-8B-Instruct"] <= 18
    # A pre-quantized checkpoint's size is its own; the fp8 flag halves only bf16 Qwen weights.
    nvfp4 = MODEL_SPECS["nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-NVFP4-QAD"]
    assert nvfp4.weight_gib(fp8=True) == nvfp4.weight_gib()
    assert all(model_id in MODEL_SPECS for model_id in HUB_IDS.values())
    check_share("unknown/model", 1.0, 0.1)  # unknown models are not refused


def test_each_engine_checks_its_own_gpu_before_loading(monkeypatch):
    settings = VideoCaptionHandler("m", model_variant="nemotron-3-nano-omni").settings
    monkeypatch.setattr(gpu_budget, "gpu_total_gib", lambda: None)  # no GPU: nothing to check
    check_engine_memory(settings, llm_kwargs(settings))
    monkeypatch.setattr(gpu_budget, "gpu_total_gib", lambda: GPU_24GB)
    with pytest.raises(ValueError, match="Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16 needs about 56"):
        check_engine_memory(settings, llm_kwargs(settings))
    fp8 = VideoCaptionHandler("m", model_variant="nemotron-fp8").settings
    check_engine_memory(fp8, llm_kwargs(fp8))


def test_engine_settings_per_family(monkeypatch):
    monkeypatch.setattr(engine_module, "gpu_available", lambda: False)
    qwen = llm_kwargs(VideoCaptionHandler("m", model_variant="qwen3").settings)
    assert qwen["mm_processor_kwargs"] == {"cap_pixels_per_frame": True}
    assert not qwen["trust_remote_code"] and "enable_prefix_caching" not in qwen
    assert (qwen["max_model_len"], qwen["max_num_batched_tokens"]) == (32768, 32768)
    for variant in NEMOTRON:
        kwargs = llm_kwargs(VideoCaptionHandler("m", model_variant=variant).settings)
        assert "mm_processor_kwargs" not in kwargs and "quantization" not in kwargs  # precision: the checkpoint's
        assert kwargs["trust_remote_code"] is True  # the checkpoints ship their config class as code
        assert kwargs["enable_prefix_caching"] is False  # vLLM's CPU Mamba prefill needs it off
        assert kwargs["limit_mm_per_prompt"] == {"image": 0, "video": 1}
    omni = llm_kwargs(VideoCaptionHandler("m", model_variant="nemotron-3-nano-omni").settings)
    assert (omni["max_model_len"], omni["max_num_batched_tokens"]) == (131072, 32768)
    user = llm_kwargs(VideoCaptionHandler("m", model_variant="nemotron", vllm_kwargs={"enable_prefix_caching": True}).settings)
    assert user["enable_prefix_caching"] is True  # --vllm-kwargs still wins
    monkeypatch.setattr(engine_module, "gpu_available", lambda: True)
    assert "enable_prefix_caching" not in llm_kwargs(VideoCaptionHandler("m", model_variant="nemotron").settings)


class _TemplateEngine:
    """Renders chats with a tiny model's tokenizer (what ``Engine.render_chat`` does, without vLLM)."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def render_chat(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def _window(frames: int = 4) -> WindowRecord:
    import numpy as np

    return WindowRecord(
        clip_id="c", source="s.mp4", window_index=0, start_frame=0, end_frame=59, start_s=0.0, end_s=2.0,
        frame_indices=tuple(range(frames)), frames=np.zeros((frames, 384, 672, 3), np.uint8),
    )


@pytest.mark.parametrize("variant, model", [("nemotron", "captioner-nemotron"),
                                            ("nemotron-3-nano-omni", "captioner-nemotron-omni")])
def test_nemotron_prompts_put_the_video_first_and_turn_reasoning_off(variant, model, nemotron_models):
    family = caption_model(variant).family
    request = VideoCaptionHandler("m", model_variant=variant).request
    assert request.family == family
    made = video_input(_TemplateEngine(nemotron_models[model]), _window(), "Describe it.", family)
    text = made["prompt"]
    assert "<|im_start|>user\n<video>Describe it.<|im_end|>\n<|im_start|>assistant\n<think></think>" in text
    assert text.endswith("<think></think>") and "/no_think" not in text
    assert text.startswith("<|im_start|>system\n") == (variant == "nemotron")  # Nano v2 VL: a /no_think system turn
    frames, metadata = made["multi_modal_data"]["video"]
    assert frames.shape == (4, 384, 672, 3) and metadata["do_sample_frames"] is False
    assert metadata["frames_indices"] == [0, 1, 2, 3] and metadata["total_num_frames"] == 4


def test_qwen_prompts_are_unchanged(captioner_dir):
    text = video_input(_TemplateEngine(captioner_dir), _window(), "Describe it.")["prompt"]
    assert "<think>" not in text and "/no_think" not in text
    assert "Describe it." in text and "<|video_pad|>" in text


@pytest.mark.parametrize("raw, caption", [
    ("A dog runs.", "A dog runs."),
    ("<think>Let me look.</think>A dog runs.", "A dog runs."),
    ("<think></think>\nA dog runs.", "\nA dog runs."),
    ("the template opened it</think>A dog runs.", "A dog runs."),
    ("<think>cut off while thinking", ""),
])
def test_reasoning_never_reaches_the_caption(raw, caption):
    assert strip_reasoning(raw) == caption


@pytest.mark.parametrize("width, height", [(1280, 720), (640, 272), (176, 144), (1920, 1080), (1080, 1920), (4096, 2160)])
def test_omni_frame_size_is_the_processors_own_size(width, height):
    """Frames sized in the prepare step are left as they are by vLLM's processor (its size rule's fixed point)."""
    pytest.importorskip("vllm")
    from vllm.transformers_utils.processors.nano_nemotron_vl import get_video_target_size_and_feature_size

    sizing = NemotronFrameSize(target_num_patches=1024)
    w, h = sizing.frame_size(width, height, 18)
    target_w, target_h, tokens = get_video_target_size_and_feature_size(w, h, 1024, True, 16, 0.5)
    assert (target_w, target_h) == (w, h) and w % 32 == 0 and h % 32 == 0
    assert tokens == sizing.tokens_per_frame(width, height) * 2  # one tubelet = 2 frames
    assert (w // 16) * (h // 16) <= 1024


def test_frame_sizes_come_from_the_checkpoint_config(nemotron_models, tmp_path):
    vl = model_frame_bounds(nemotron_models["captioner-nemotron"], "nemotron")
    omni = model_frame_bounds(nemotron_models["captioner-nemotron-omni"], "nemotron-3-nano-omni")
    assert vl == NemotronFrameSize(512, 16, 0.5, None, False) and vl.frame_size(1920, 1080, 18) == (512, 512)
    assert vl.tokens_per_frame(1920, 1080) == 256
    assert omni.target_num_patches == 1024 and omni.frame_size(640, 360, 8) == (672, 384)
    assert omni.tokens_per_frame(640, 360) == 126  # 252 a 2-frame tubelet
    # An empty directory (the checkpoint not downloaded yet): the real checkpoints' sizes.
    assert model_frame_bounds(str(tmp_path), "nemotron-fp8").frame_size(1920, 1080) == (512, 512)
    assert model_frame_bounds(str(tmp_path), "nemotron-3-nano-omni").frame_size(640, 360) == (672, 384)
    assert isinstance(model_frame_bounds(str(tmp_path), "qwen"), FrameBounds)


@pytest.mark.parametrize("variant, model, size", [("nemotron", "captioner-nemotron", (512, 512)),
                                                  ("nemotron-3-nano-omni", "captioner-nemotron-omni", (672, 384))])
def test_the_prepare_step_sizes_nemotron_frames(variant, model, size, nemotron_models, real_clips_dir):
    """Frames leave the prepare step at the model's size, so Beam elements stay small."""
    from beam_captions.records import ClipRef
    from beam_captions.transforms.prepare import PrepareWindows, prepare_clip

    config = PrepareWindows(model_dir=nemotron_models[model], model_variant=variant).config
    source = os.path.join(real_clips_dir, "bigbuckbunny.mp4")  # 1280x720
    records = [r for r in prepare_clip(ClipRef(source=source, clip_id="bunny"), config) if isinstance(r, WindowRecord)]
    assert records and all(r.frames.shape[1:] == (size[1], size[0], 3) for r in records)
