"""Two vLLM engines on one GPU: the memory share of each, and whether a model fits in it.

vLLM's ``gpu_memory_utilization`` is the share of the whole GPU an engine may hold (weights,
activations, KV cache). With the enhancer on, the captioner and the enhancer run in the same
worker, so their shares must add up to less than the card, with headroom for CUDA contexts.
The defaults fit Qwen2.5-VL-7B plus Qwen2.5-14B in bf16 on one 80 GB GPU with room for a full
32k-token sequence each (see ``tests/test_gpu_budget.py``). The alternative is right fitting:
give the two steps separate GPU workers (``--accelerator`` hints) and keep 0.85 for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ModelSpec", "MODEL_SPECS", "memory_shares", "kv_token_capacity", "SOLO_SHARE", "PAIR_SHARES", "MAX_TOTAL_SHARE"]

SOLO_SHARE = 0.85
PAIR_SHARES = (0.35, 0.55)  # (captioner, enhancer) when both share a GPU
MAX_TOTAL_SHARE = 0.92
GIB = 2**30


@dataclass(frozen=True)
class ModelSpec:
    """The numbers that decide a model's GPU footprint."""

    params_billion: float
    layers: int
    kv_heads: int
    head_dim: int
    activation_gib: float = 3.0  # profiling peak, vision encoder, sampler and CUDA-graph pools

    def weight_gib(self, fp8: bool = False) -> float:
        return self.params_billion * 1e9 * (1 if fp8 else 2) / GIB

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # keys and values, bf16


MODEL_SPECS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": ModelSpec(8.29, 28, 4, 128, activation_gib=4.0),
    "Qwen/Qwen3-VL-8B-Instruct": ModelSpec(8.77, 36, 8, 128, activation_gib=4.0),
    "Qwen/Qwen2.5-14B-Instruct": ModelSpec(14.77, 48, 8, 128),
    "Qwen/Qwen3-14B": ModelSpec(14.77, 40, 8, 128),
}


def memory_shares(
    enhance: bool, caption_share: Optional[float] = None, enhance_share: Optional[float] = None
) -> tuple[float, Optional[float]]:
    """``gpu_memory_utilization`` of the captioner and (when on) the enhancer; refuses an overcommit."""
    if not enhance:
        return (caption_share or SOLO_SHARE, None)
    shares = (caption_share or PAIR_SHARES[0], enhance_share or PAIR_SHARES[1])
    if sum(shares) > MAX_TOTAL_SHARE:
        raise ValueError(
            f"captioner ({shares[0]}) and enhancer ({shares[1]}) GPU memory shares add up to {sum(shares):.2f}; "
            f"keep them at or below {MAX_TOTAL_SHARE} or give the steps separate GPU workers"
        )
    return shares


def kv_token_capacity(spec: ModelSpec, gpu_gib: float, share: float, fp8: bool = False) -> int:
    """Tokens of KV cache left in ``share`` of a ``gpu_gib`` card after weights and activations (0 if none)."""
    free = gpu_gib * share - spec.weight_gib(fp8) - spec.activation_gib
    return max(0, int(free * GIB // spec.kv_bytes_per_token()))
