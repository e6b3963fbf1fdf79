"""Tiny random-weight Qwen checkpoints, built offline in seconds.

Each builder writes an ordinary Hugging Face model directory (config, bf16
safetensors, tokenizer, processor, chat template, generation config) that
loads in transformers and in vLLM like the real checkpoint, so the captioning
pipeline can run end to end without the Hugging Face hub. The weights are
random: outputs are word-like gibberish, not captions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from beam_captions.tiny_models.common import (
    MARKER_FILE,
    build_once,
    content_items_template,
    non_word_ids,
    token_id,
    train_bpe,
)

__all__ = [
    "MARKER_FILE",
    "build_tiny_qwen25_vl",
    "build_tiny_qwen2_text",
    "build_tiny_qwen3_text",
    "build_tiny_qwen3_vl",
    "with_real_processor_config",
]

VOCAB_SIZE = 512
TEXT_HIDDEN = 128
TEXT_HEADS = 2
TEXT_LAYERS = 2
VISION_HIDDEN = 64
MAX_POSITIONS = 32768
MIN_FRAME_TOKENS = 4
MAX_FRAME_TOKENS = 32

STOP_WORD = " the"  # answers end where the model would say this word (see ``_random_model``)
STOP_SCALE = 1.03

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
THINK_TOKENS = ("<think>", "</think>")

# preprocessor_config.json of Qwen/Qwen2.5-VL-7B-Instruct, which ships no video processor config:
# image bounds (3136 to 16384 * 28 * 28 pixels) that transformers then applies to video frames too.
QWEN25_VL_7B_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


_TEMPLATE_HEAD = """\
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- else %}
""" + content_items_template("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>") + """\
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
"""
_TEMPLATE_NO_THINKING = """\
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
"""
_TEMPLATE_TAIL = "{%- endif %}\n"


def _chat_template(thinking: bool) -> str:
    """Return a Qwen-style ChatML template; ``thinking`` adds ``enable_thinking``."""
    middle = _TEMPLATE_NO_THINKING if thinking else ""
    return _TEMPLATE_HEAD + middle + _TEMPLATE_TAIL


def _build_tokenizer(thinking: bool) -> Any:
    """Build a ``Qwen2Tokenizer`` with Qwen's special tokens and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(VOCAB_SIZE - len(SPECIAL_TOKENS) - len(THINK_TOKENS))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    tokenizer.add_tokens(specials, special_tokens=True)
    if thinking:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = _chat_template(thinking)
    return tokenizer


def _vision_token_ids(tokenizer: Any) -> dict[str, int]:
    """Top-level VL config fields holding the vision placeholder token ids."""
    return {
        "image_token_id": token_id(tokenizer, "<|image_pad|>"),
        "video_token_id": token_id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": token_id(tokenizer, "<|vision_end|>"),
    }


def _text_kwargs(tokenizer: Any) -> dict[str, Any]:
    """Shared decoder sizes and special-token ids for every tiny model."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
        "bos_token_id": token_id(tokenizer, "<|endoftext|>"),
        "eos_token_id": token_id(tokenizer, "<|im_end|>"),
        "pad_token_id": token_id(tokenizer, "<|endoftext|>"),
    }


def _generation_config(tokenizer: Any) -> Any:
    """Generation config stopping at ``<|im_end|>`` or ``<|endoftext|>``."""
    from transformers import GenerationConfig

    end_of_text = token_id(tokenizer, "<|endoftext|>")
    return GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[token_id(tokenizer, "<|im_end|>"), end_of_text],
        pad_token_id=end_of_text,
    )


def _pixel_bounds(patch_size: int, merge_size: int = 2) -> dict[str, int]:
    """Per-frame pixel bounds as Qwen processors store them (``size`` edges)."""
    unit = (patch_size * merge_size) ** 2
    return {"shortest_edge": MIN_FRAME_TOKENS * unit, "longest_edge": MAX_FRAME_TOKENS * unit}


def _random_model(model_cls: type, config: Any, tokenizer: Any, seed: int) -> Any:
    """Instantiate seeded random bf16 weights that emit word pieces and stop at varied lengths.

    Zeroing the output rows of special and non-word tokens pins their logits
    at 0 while word pieces get random ones, so near-greedy decoding yields
    visible word-like text. The end-of-turn row is then a slightly scaled copy
    of the row of ``STOP_WORD``: the model ends its answer where it would have
    said that word, which depends on the input, so answers end at varied
    lengths (a few tokens to past the limit), as a real model's do.
    """
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        rows = model.get_output_embeddings().weight
        rows[non_word_ids(tokenizer)] = 0
        (stop_word,) = tokenizer.encode(STOP_WORD, add_special_tokens=False)
        rows[token_id(tokenizer, "<|im_end|>")] = rows[stop_word] * STOP_SCALE
    model.generation_config = _generation_config(tokenizer)
    return model


def _save_processor(
    path: Path, tokenizer: Any, image_processor: Any, video_processor: Any, processor_class: str, legacy: bool
) -> None:
    """Save tokenizer and preprocessor files in the layout of the real checkpoints.

    Writes ``preprocessor_config.json`` and ``video_preprocessor_config.json``
    (tagged with ``processor_class``); ``legacy`` also mirrors ``size`` as the
    ``min_pixels``/``max_pixels`` keys that Qwen2.5-VL checkpoints carry.
    """
    tokenizer.save_pretrained(path)
    parts = {"preprocessor_config.json": image_processor, "video_preprocessor_config.json": video_processor}
    for name, part in parts.items():
        part.save_pretrained(path)
        data = json.loads((path / name).read_text())
        data["processor_class"] = processor_class
        if legacy:
            data["min_pixels"] = data["size"]["shortest_edge"]
            data["max_pixels"] = data["size"]["longest_edge"]
        (path / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_qwen25_vl(path: Path, seed: int) -> None:
    """Write a tiny ``Qwen2_5_VLForConditionalGeneration`` checkpoint."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(thinking=False)
    config = Qwen2_5_VLConfig(
        text_config={
            **_text_kwargs(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        tie_word_embeddings=False,
        **_vision_token_ids(tokenizer),
    )
    _random_model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed).save_pretrained(path)
    bounds = _pixel_bounds(patch_size=14)
    _save_processor(
        path,
        tokenizer,
        Qwen2VLImageProcessor(size=bounds, patch_size=14),
        Qwen2VLVideoProcessor(size=bounds, patch_size=14),
        processor_class="Qwen2_5_VLProcessor",
        legacy=True,
    )


def _write_qwen3_vl(path: Path, seed: int) -> None:
    """Write a tiny ``Qwen3VLForConditionalGeneration`` checkpoint."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(thinking=True)
    config = Qwen3VLConfig(
        text_config={
            **_text_kwargs(tokenizer),
            "head_dim": TEXT_HIDDEN // TEXT_HEADS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        tie_word_embeddings=False,
        **_vision_token_ids(tokenizer),
    )
    _random_model(Qwen3VLForConditionalGeneration, config, tokenizer, seed).save_pretrained(path)
    bounds = _pixel_bounds(patch_size=16)
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    _save_processor(
        path,
        tokenizer,
        Qwen2VLImageProcessor(size=bounds, patch_size=16, **half),
        Qwen3VLVideoProcessor(size=bounds, patch_size=16, **half),
        processor_class="Qwen3VLProcessor",
        legacy=False,
    )


def _write_text(path: Path, seed: int, qwen3: bool) -> None:
    """Write a tiny ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = _build_tokenizer(thinking=qwen3)
    if qwen3:
        config = Qwen3Config(**_text_kwargs(tokenizer), head_dim=TEXT_HIDDEN // TEXT_HEADS)
        model_cls = Qwen3ForCausalLM
    else:
        config = Qwen2Config(**_text_kwargs(tokenizer))
        model_cls = Qwen2ForCausalLM
    _random_model(model_cls, config, tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _write_real_processor_config(path: Path, qwen3: bool) -> None:
    """Replace a tiny captioner's processor configs by the real checkpoint's (Qwen3-VL: transformers' defaults)."""
    if qwen3:
        from transformers import Qwen3VLVideoProcessor

        Qwen3VLVideoProcessor().save_pretrained(path)  # bounds over the whole clip: 128 to 768 x 32 x 32 pixels
        name = path / "video_preprocessor_config.json"
        data = json.loads(name.read_text())
        name.write_text(json.dumps({**data, "processor_class": "Qwen3VLProcessor"}, indent=2, sort_keys=True) + "\n")
    else:
        (path / "video_preprocessor_config.json").unlink(missing_ok=True)
        text = json.dumps(QWEN25_VL_7B_PREPROCESSOR, indent=2, sort_keys=True) + "\n"
        (path / "preprocessor_config.json").write_text(text)


def with_real_processor_config(model_dir: str, out_dir: str, qwen3: bool = False) -> str:
    """Copy tiny captioner ``model_dir`` to ``out_dir`` with the real checkpoint's processor configs; return it.

    Qwen2.5-VL: Qwen2.5-VL-7B-Instruct's image-only ``preprocessor_config.json`` and no video
    processor config. Qwen3-VL (``qwen3``): the installed transformers' Qwen3-VL video
    processor defaults. The weights stay tiny and random.
    """

    def write(path: Path) -> None:
        shutil.copytree(model_dir, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER_FILE))
        _write_real_processor_config(path, qwen3)

    return build_once(out_dir, write)


def build_tiny_qwen25_vl(out_dir: str, seed: int = 0) -> str:
    """Build a tiny Qwen2.5-VL video captioner in ``out_dir``; return its path."""
    return build_once(out_dir, lambda path: _write_qwen25_vl(path, seed))


def build_tiny_qwen3_vl(out_dir: str, seed: int = 0) -> str:
    """Build a tiny Qwen3-VL video captioner in ``out_dir``; return its path."""
    return build_once(out_dir, lambda path: _write_qwen3_vl(path, seed))


def build_tiny_qwen2_text(out_dir: str, seed: int = 0) -> str:
    """Build a tiny text-only Qwen2 caption enhancer in ``out_dir``; return its path."""
    return build_once(out_dir, lambda path: _write_text(path, seed, qwen3=False))


def build_tiny_qwen3_text(out_dir: str, seed: int = 0) -> str:
    """Build a tiny Qwen3 enhancer (``enable_thinking`` template) in ``out_dir``."""
    return build_once(out_dir, lambda path: _write_text(path, seed, qwen3=True))
