"""Model families the pipeline knows, by the names the CLI accepts.

A caption variant (``--captioning-algorithm``) names one checkpoint (``CaptionModel``): its hub id, its
precision and its family. A family (``CaptionFamily``) is what the code does differently for a kind of
model: how its chat prompt is rendered, how its frames are sized in the prepare step, which vLLM
settings it needs. Everything per variant lives in the two tables below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "CAPTION_ALGORITHMS",
    "CAPTION_FAMILIES",
    "CAPTION_MODELS",
    "CAPTION_VARIANTS",
    "CaptionFamily",
    "CaptionModel",
    "ENHANCE_ALGORITHMS",
    "ENHANCE_MODELS",
    "caption_model",
    "canonical_variant",
]

_ALIASES = {"qwen": "qwen2.5", "qwen2.5": "qwen2.5", "qwen3": "qwen3"}

# Hugging Face ids of the real text checkpoints for each enhancer family.
ENHANCE_MODELS = {"qwen2.5": "Qwen/Qwen2.5-14B-Instruct", "qwen3": "Qwen/Qwen3-14B"}
ENHANCE_ALGORITHMS = ("qwen", "qwen2.5", "qwen3")


@dataclass(frozen=True)
class CaptionFamily:
    """What a kind of video model needs from the pipeline.

    ``frames``: how the prepare step sizes model frames (``qwen``: the reference's pixel bounds with
    ``factor``-pixel merged patches; ``nemotron``: the checkpoint's fixed tile or target patch count).
    ``system_prompt``: a system turn put before the user turn (Nemotron Nano v2 VL turns reasoning
    off with ``/no_think``). ``template_kwargs``: chat template switches (the Omni model's
    ``enable_thinking=False``). ``mm_processor_kwargs``: vLLM processor arguments. ``mamba``: a hybrid
    Mamba model, whose CPU kernels need prefix caching off. ``trust_remote_code``: the checkpoints
    ship their config class as code (the real Nemotron ones do), so vLLM must be allowed to run it.
    ``timestamps``: the model reads each frame's time from the video metadata (Qwen3-VL puts
    ``<t seconds>`` text before each frame), so the metadata can carry the clip's true times.
    ``trained_pruning_rate``: the video token pruning rate (vLLM's ``video_pruning_rate``, EVS) the
    family's checkpoints were trained with (their config's default); the pipeline's default is the
    reference's 0 whatever the family. ``reasoning``: a reasoning model whose chat turns reasoning off, which
    still answers at times with reasoning alone (Nemotron 3 Nano Omni): such a caption is retried once.
    """

    name: str
    frames: str
    factor: int = 0
    system_prompt: Optional[str] = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    mm_processor_kwargs: tuple[tuple[str, Any], ...] = ()
    mamba: bool = False
    trust_remote_code: bool = False
    max_model_len: int = 32768
    timestamps: bool = False
    trained_pruning_rate: float = 0.0
    reasoning: bool = False

    def messages(self, prompt: str) -> list[dict]:
        """The chat of one captioning request: one video, then ``prompt``."""
        user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}
        return ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [user]


QWEN25 = CaptionFamily("qwen2.5", "qwen", factor=28, mm_processor_kwargs=(("cap_pixels_per_frame", True),))
QWEN3 = CaptionFamily(
    "qwen3", "qwen", factor=32, mm_processor_kwargs=(("cap_pixels_per_frame", True),), timestamps=True
)
NEMOTRON_VL = CaptionFamily(
    "nemotron-vl", "nemotron", system_prompt="/no_think", mamba=True, trust_remote_code=True,
    trained_pruning_rate=0.7, reasoning=True,
)
NEMOTRON_OMNI = CaptionFamily(
    "nemotron-omni", "nemotron", template_kwargs=(("enable_thinking", False),), mamba=True,
    trust_remote_code=True, max_model_len=131072, trained_pruning_rate=0.7, reasoning=True,
)
CAPTION_FAMILIES = {f.name: f for f in (QWEN25, QWEN3, NEMOTRON_VL, NEMOTRON_OMNI)}


@dataclass(frozen=True)
class CaptionModel:
    """One ``--captioning-algorithm`` value: the checkpoint it downloads and how it runs.

    ``precision``: the checkpoint's weights. ``fp8_flag``: whether ``--captioning-use-fp8-weights``
    (vLLM's on-the-fly fp8) applies; where it does not, ``fp8_hint`` says what to use instead.
    """

    variant: str
    family: CaptionFamily
    hub_id: str
    precision: str = "bf16"
    fp8_flag: bool = False
    fp8_hint: str = ""


_NEMOTRON_12B_FP8_HINT = "use --captioning-algorithm nemotron-fp8 (a pre-quantized fp8 checkpoint)"
CAPTION_VARIANTS: dict[str, CaptionModel] = {
    m.variant: m
    for m in (
        CaptionModel("qwen2.5", QWEN25, "Qwen/Qwen2.5-VL-7B-Instruct", fp8_flag=True),
        CaptionModel("qwen3", QWEN3, "Qwen/Qwen3-VL-8B-Instruct", fp8_flag=True),
        CaptionModel("nemotron-bf16", NEMOTRON_VL, "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16",
                     fp8_hint=_NEMOTRON_12B_FP8_HINT),
        CaptionModel("nemotron-fp8", NEMOTRON_VL, "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-FP8", precision="fp8",
                     fp8_hint="nemotron-fp8 is already fp8; drop --captioning-use-fp8-weights"),
        CaptionModel("nemotron-nvfp4", NEMOTRON_VL, "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-NVFP4-QAD",
                     precision="nvfp4", fp8_hint=_NEMOTRON_12B_FP8_HINT),
        CaptionModel("nemotron-3-nano-omni", NEMOTRON_OMNI, "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16",
                     fp8_hint="nemotron-3-nano-omni runs its bf16 checkpoint; drop --captioning-use-fp8-weights, "
                              "or use --captioning-algorithm nemotron-fp8 for an fp8 Nemotron"),
    )
}
_CAPTION_ALIASES = {"qwen": "qwen2.5", "nemotron": "nemotron-bf16", **{name: name for name in CAPTION_VARIANTS}}
CAPTION_ALGORITHMS = tuple(sorted(_CAPTION_ALIASES, key=lambda n: (list(CAPTION_VARIANTS).index(_CAPTION_ALIASES[n]), n)))

# Hugging Face ids of the real checkpoints for each caption variant (and alias).
CAPTION_MODELS = {name: CAPTION_VARIANTS[variant].hub_id for name, variant in _CAPTION_ALIASES.items()}


def caption_model(name: str) -> CaptionModel:
    """The ``CaptionModel`` of a ``--captioning-algorithm`` value (aliases included)."""
    try:
        return CAPTION_VARIANTS[_CAPTION_ALIASES[name.lower()]]
    except KeyError:
        raise ValueError(
            f"unknown captioning model variant {name!r}; choose one of {', '.join(CAPTION_ALGORITHMS)}"
        ) from None


def canonical_variant(name: str) -> str:
    """``qwen`` and ``qwen2.5`` mean Qwen2.5; ``qwen3`` means Qwen3 (the enhancer's and Qwen frame bounds' names)."""
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; choose one of qwen, qwen2.5, qwen3") from None
