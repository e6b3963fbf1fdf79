"""Model families the pipeline knows, by the names the CLI accepts."""

from __future__ import annotations

__all__ = ["CAPTION_MODELS", "ENHANCE_MODELS", "canonical_variant"]

_ALIASES = {"qwen": "qwen2.5", "qwen2.5": "qwen2.5", "qwen3": "qwen3"}

# Hugging Face ids of the real checkpoints for each family.
CAPTION_MODELS = {"qwen2.5": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen3": "Qwen/Qwen3-VL-8B-Instruct"}
ENHANCE_MODELS = {"qwen2.5": "Qwen/Qwen2.5-14B-Instruct", "qwen3": "Qwen/Qwen3-14B"}


def canonical_variant(name: str) -> str:
    """``qwen`` and ``qwen2.5`` mean Qwen2.5; ``qwen3`` means Qwen3."""
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; choose one of qwen, qwen2.5, qwen3") from None
