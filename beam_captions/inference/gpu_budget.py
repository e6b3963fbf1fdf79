"""Two vLLM engines on one GPU: the memory share of each, and whether a model fits in it.

vLLM's ``gpu_memory_utilization`` is the share of the whole GPU an engine may hold (weights,
activations, KV cache). With the enhancer on, the captioner and the enhancer run in the same
worker, so their shares must add up to less than the card, with headroom for CUDA contexts.
The defaults fit Qwen2.5-VL-7B plus Qwen2.5-14B in bf16 on one 80 GB GPU with room for a full
32k-token sequence each (see ``tests/test_gpu_budget.py``). The alternative is right fitting:
give the two steps separate GPU workers (``--accelerator`` hints) and keep 0.85 for each.

``check_share`` refuses a share that cannot hold a checkpoint's weights and the KV cache of one full
sequence (``max_model_len``, 32k by default) on a GPU of a given size, and warns when the estimated
activations may not fit on top (vLLM's own profiling has the last word there): the command
line runs it before the job with ``--gpu-memory-gib`` or this machine's GPU, and every engine runs it
again on its worker's GPU before loading. Weight sizes are per checkpoint (a pre-quantized Nemotron
checkpoint's precision is its own; ``fp8`` halves the bf16 Qwen weights, vLLM's on-the-fly fp8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "ModelSpec", "MODEL_SPECS", "memory_shares", "kv_token_capacity", "check_share", "gpu_total_gib",
    "SOLO_SHARE", "PAIR_SHARES", "MAX_TOTAL_SHARE",
]

log = logging.getLogger(__name__)

SOLO_SHARE = 0.85
PAIR_SHARES = (0.35, 0.55)  # (captioner, enhancer) when both share a GPU
MAX_TOTAL_SHARE = 0.92
GIB = 2**30


@dataclass(frozen=True)
class ModelSpec:
    """The numbers that decide a model's GPU footprint.

    ``layers``: the layers with a KV cache (a Mamba hybrid's attention layers only; its Mamba state
    is a fixed size per sequence, counted in ``activation_gib``). ``weight_gb``: the checkpoint's
    weights where they are not bf16 params x 2 bytes (pre-quantized or stated by the model card).
    """

    params_billion: float
    layers: int
    kv_heads: int
    head_dim: int
    activation_gib: float = 3.0  # profiling peak, vision encoder, sampler and CUDA-graph pools
    weight_gb: Optional[float] = None

    def weight_gib(self, fp8: bool = False) -> float:
        if self.weight_gb is not None:  # a fixed-precision checkpoint: the fp8 flag does not apply
            return self.weight_gb * 1e9 / GIB
        return self.params_billion * 1e9 * (1 if fp8 else 2) / GIB

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # keys and values, bf16


MODEL_SPECS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": ModelSpec(8.29, 28, 4, 128, activation_gib=4.0),
    "Qwen/Qwen3-VL-8B-Instruct": ModelSpec(8.77, 36, 8, 128, activation_gib=4.0),
    "Qwen/Qwen2.5-14B-Instruct": ModelSpec(14.77, 48, 8, 128),
    "Qwen/Qwen3-14B": ModelSpec(14.77, 40, 8, 128),
    # Nemotron Nano 12B v2 VL: 62 hybrid layers, 6 of them attention (8 KV heads of 128); weights
    # about 24 GB in bf16, 12 GB in fp8, 7 GB in nvfp4 (the figures, from the model cards).
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16": ModelSpec(12.0, 6, 8, 128, activation_gib=4.0, weight_gb=24.0),
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-FP8": ModelSpec(12.0, 6, 8, 128, activation_gib=4.0, weight_gb=12.0),
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-NVFP4-QAD": ModelSpec(12.0, 6, 8, 128, activation_gib=4.0, weight_gb=7.0),
    # Nemotron 3 Nano Omni 30B-A3B: 52 hybrid layers, 6 attention (2 KV heads of 128); about 60 GB in bf16.
    "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16": ModelSpec(30.0, 6, 2, 128, activation_gib=4.0, weight_gb=60.0),
}
SEQUENCE_TOKENS = 32768  # the full sequence a share must hold besides the weights


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


def required_gib(spec: ModelSpec, fp8: bool = False, tokens: int = SEQUENCE_TOKENS) -> float:
    """GPU memory an engine needs: weights, activations and the KV cache of one ``tokens``-long sequence."""
    return spec.weight_gib(fp8) + spec.activation_gib + tokens * spec.kv_bytes_per_token() / GIB


def check_share(
    model_id: Optional[str], gpu_gib: float, share: float, fp8: bool = False, tokens: int = SEQUENCE_TOKENS,
    flag: str = "--captioning-gpu-memory-share",
) -> None:
    """Raise ``ValueError`` (one line) when ``share`` of a ``gpu_gib`` GPU cannot hold ``model_id``'s weights and
    the KV cache of one ``tokens``-long sequence (vLLM would refuse to start); warn when the estimated activations
    on top may not fit (an estimate: vLLM's profiling decides). Unknown models pass."""
    spec = MODEL_SPECS.get(model_id or "")
    if spec is None or gpu_gib <= 0:
        return
    need, have = required_gib(spec, fp8, tokens), gpu_gib * share
    hard = need - spec.activation_gib
    if need <= have:
        return
    fits = (hard if hard > have else need) / gpu_gib
    hint = f"raise {flag} to {fits:.2f}" if fits <= SOLO_SHARE else "use a larger GPU or a smaller checkpoint"
    message = (
        f"{model_id}{' (fp8)' if fp8 and spec.weight_gb is None else ''} needs about {hard:.1f} GiB "
        f"({spec.weight_gib(fp8):.1f} GiB weights + a {tokens}-token sequence)"
    )
    if hard > have:
        raise ValueError(f"{message} but gets {have:.1f} GiB ({share} of {gpu_gib:.1f} GiB); {hint}")
    log.warning(
        "%s, and about %.1f GiB of activations on top, in %.1f GiB (%s of %.1f GiB): it may not start; %s",
        message, spec.activation_gib, have, share, gpu_gib, hint,
    )


def gpu_total_gib() -> Optional[float]:
    """Total memory of this machine's first CUDA GPU, or None without one (or without torch)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU to check against
        return None
