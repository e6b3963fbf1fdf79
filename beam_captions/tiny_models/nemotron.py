"""Tiny random-weight NVIDIA Nemotron VL checkpoints, built offline.

Two families run through vLLM's ``NemotronH_Nano_VL_V2`` model class
(``vllm/model_executor/models/nano_nemotron_vl.py``): a RADIO ViT, an MLP
projector and a hybrid Mamba/attention NemotronH language model.

* ``build_tiny_nemotron_vl``: like ``nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL``
  (architecture ``NemotronH_Nano_VL_V2``): one 512x512 tile per frame,
  no temporal patching (256 tokens per frame), Mamba + MLP + attention layers;
  its chat template, like the real one, turns reasoning off for a ``/no_think`` system turn.
* ``build_tiny_nemotron_omni``: like ``nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning``
  (architecture ``NemotronH_Nano_Omni_Reasoning_V3``): two frames per tubelet,
  frames resized to about ``video_target_num_patches`` patches keeping the
  aspect ratio, thinking chat template; Mamba + MLP + attention layers by
  default, Mamba + MoE + attention (the real layout, GPU only) with ``moe=True``.
  The audio (Parakeet) branch is left out.

vLLM ships no config class for these checkpoints, and transformers' own
``nemotron_h_omni`` config renames fields that vLLM still reads
(``vit_hidden_size``) and rejects ``video_temporal_patch_size=1``. The real
checkpoints load their config through ``trust_remote_code``; so do these: each
directory carries a small ``configuration_tiny_nemotron.py`` (written here,
no hub code) with the hub config's field names, and must be loaded with
``trust_remote_code=True``.

The weights are random: the output is word-like gibberish.
"""

from __future__ import annotations

import json
import tempfile
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
    "OMNI_ARCHITECTURE",
    "VL_ARCHITECTURE",
    "build_tiny_nemotron_omni",
    "build_tiny_nemotron_vl",
    "nemotron_video_prompt",
]

VL_ARCHITECTURE = "NemotronH_Nano_VL_V2"
OMNI_ARCHITECTURE = "NemotronH_Nano_Omni_Reasoning_V3"

VOCAB_SIZE = 512
TEXT_HIDDEN = 64
HEAD_DIM = 64
VIT_HIDDEN = 32
VIT_LAYERS = 2
VIT_HEADS = 2
PROJECTOR_HIDDEN = 64
IMAGE_SIZE = 512
PATCH_SIZE = 16
CPE_MAX_SIZE = 1024
MAX_POSITIONS = 131072
NORM_MEAN = [0.48145466, 0.4578275, 0.40821073]
NORM_STD = [0.26862954, 0.26130258, 0.27577711]

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<img>",
    "</img>",
    "<video>",
    "<so_embedding>",
    "<so_start>",
    "<so_end>",
)
THINK_TOKENS = ("<think>", "</think>")

_CHAT_TEMPLATE = """\
{%- set ns = namespace(no_think=false) %}
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is string %}
{%- if message['role'] == 'system' and '/no_think' in message['content'] %}
{%- set ns.no_think = true %}
{{- message['content'].replace('/no_think', '').strip() }}
{%- else %}
{{- message['content'] }}
{%- endif %}
{%- else %}
""" + content_items_template("<image>", "<video>") + """\
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if ns.no_think or (enable_thinking is defined and enable_thinking is false) %}
{{- '<think></think>' }}
{%- endif %}
{%- endif %}
"""

# Our own config class, shipped in the model directory (``auto_map``), using the
# field names of the hub's remote-code config that vLLM's model class reads.
_CONFIG_MODULE = '''\
"""Config for a tiny random Nemotron VL checkpoint (beam-captions tests)."""

from transformers import PretrainedConfig
from transformers.models.nemotron_h import NemotronHConfig


class TinyNemotronVLConfig(PretrainedConfig):
    model_type = "NemotronH_Nano_VL_V2"

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        force_image_size=512,
        patch_size=16,
        downsample_ratio=0.5,
        template=None,
        ps_version="v2",
        image_tag_type="internvl",
        projector_hidden_size=4096,
        vit_hidden_size=1280,
        video_pruning_rate=0.0,
        norm_mean=(0.48145466, 0.4578275, 0.40821073),
        norm_std=(0.26862954, 0.26130258, 0.27577711),
        use_thumbnail=True,
        **kwargs,
    ):
        # Sub-configs first: the base __init__ validates token ids via get_text_config().
        if isinstance(vision_config, PretrainedConfig):
            vision_config = vision_config.to_dict()
        self.vision_config = PretrainedConfig(**(vision_config or {}))
        if isinstance(llm_config, PretrainedConfig):
            llm_config = llm_config.to_dict()
        llm_config = dict(llm_config or {})
        llm_config.pop("model_type", None)
        self.llm_config = NemotronHConfig(**llm_config)
        self.force_image_size = force_image_size
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.ps_version = ps_version
        self.image_tag_type = image_tag_type
        self.projector_hidden_size = projector_hidden_size
        self.vit_hidden_size = vit_hidden_size
        self.video_pruning_rate = video_pruning_rate
        self.norm_mean = list(norm_mean)
        self.norm_std = list(norm_std)
        self.use_thumbnail = use_thumbnail
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.llm_config
'''


def nemotron_video_prompt(tokenizer: Any, text: str, thinking: bool | None = None) -> str:
    """Render one user turn (one video, then ``text``) with the model's chat template."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def _build_tokenizer(thinking: bool) -> Any:
    """Byte-level BPE with Nemotron's vision/audio placeholders and ChatML turns."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    extra = len(SPECIAL_TOKENS) + (len(THINK_TOKENS) if thinking else 0)
    vocab, merges = train_bpe(VOCAB_SIZE - extra - 8)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="</s>",
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    if thinking:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = _CHAT_TEMPLATE
    if len(tokenizer) > VOCAB_SIZE:
        raise ValueError(f"tiny tokenizer has {len(tokenizer)} tokens > {VOCAB_SIZE}")
    return tokenizer


def _llm_config(tokenizer: Any, pattern: str, moe: bool) -> dict[str, Any]:
    """NemotronH (hybrid Mamba2 / attention / MLP or MoE) text config, hub field names."""
    config: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN,
        "hybrid_override_pattern": pattern,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": HEAD_DIM,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "mlp_hidden_act": "relu2",
        "ssm_state_size": 16,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "n_groups": 1,
        "conv_kernel": 4,
        "expand": 1,
        "chunk_size": 128,
        "mamba_ssm_cache_dtype": "float32",
        "dtype": "bfloat16",  # vLLM asserts language_model.config.dtype is a torch.dtype
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
        "bos_token_id": token_id(tokenizer, "<s>"),
        "eos_token_id": token_id(tokenizer, "<|im_end|>"),
        "pad_token_id": token_id(tokenizer, "</s>"),
    }
    if moe:
        config.update(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=TEXT_HIDDEN,
            moe_shared_expert_intermediate_size=TEXT_HIDDEN,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
        )
    return config


def _vision_config(temporal_patch: int, target_num_patches: int | None) -> dict[str, Any]:
    """RADIO config the way vLLM reads it: ``args`` overrides the timm preset sizes."""
    config: dict[str, Any] = {
        "args": {
            "model": "vit_small_patch16_224",  # vLLM's preset; sizes below override it
            "hidden_size": VIT_HIDDEN,
            "num_hidden_layers": VIT_LAYERS,
            "num_attention_heads": VIT_HEADS,
            "intermediate_size": 2 * VIT_HIDDEN,
            "cpe_max_size": CPE_MAX_SIZE,
            "register_multiple": 4,
            "teachers": [],
            "cls_token_per_teacher": False,
        },
        "patch_size": PATCH_SIZE,
        "preferred_resolution": [IMAGE_SIZE, IMAGE_SIZE],
        "video_temporal_patch_size": temporal_patch,
        "separate_video_embedder": True,
    }
    if target_num_patches is not None:
        config["video_target_num_patches"] = target_num_patches
        config["video_maintain_aspect_ratio"] = True
    return config


def _radio_weights(generator: Any, temporal_patch: int) -> dict[str, Any]:
    """Random RADIO tensors under the checkpoint names vLLM's ``RadioModel`` loads."""
    import torch

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    d, mlp = VIT_HIDDEN, 2 * VIT_HIDDEN
    pg = "vision_model.radio_model.model.patch_generator."
    grid = (CPE_MAX_SIZE // PATCH_SIZE) ** 2
    weights = {
        pg + "embedder.weight": rand(d, 3 * PATCH_SIZE**2),
        pg + "pos_embed": rand(1, grid, d, scale=0.02),
        pg + "cls_token.token": rand(4, d, scale=0.02),  # 1 cls + 3 registers (register_multiple 4)
    }
    if temporal_patch > 1:
        weights[pg + "video_embedder.weight"] = rand(d, 3 * temporal_patch * PATCH_SIZE**2)
    for i in range(VIT_LAYERS):
        b = f"vision_model.radio_model.model.blocks.{i}."
        weights |= {
            b + "norm1.weight": torch.ones(d),
            b + "norm1.bias": torch.zeros(d),
            b + "attn.qkv.weight": rand(3 * d, d),
            b + "attn.qkv.bias": torch.zeros(3 * d),
            b + "attn.proj.weight": rand(d, d),
            b + "attn.proj.bias": torch.zeros(d),
            b + "norm2.weight": torch.ones(d),
            b + "norm2.bias": torch.zeros(d),
            b + "mlp.fc1.weight": rand(mlp, d),
            b + "mlp.fc1.bias": torch.zeros(mlp),
            b + "mlp.fc2.weight": rand(d, mlp),
            b + "mlp.fc2.bias": torch.zeros(d),
        }
    shuffled = VIT_HIDDEN * 4  # pixel shuffle with downsample_ratio 0.5
    weights |= {
        "mlp1.0.weight": torch.ones(shuffled),
        "mlp1.1.weight": rand(PROJECTOR_HIDDEN, shuffled, scale=0.1),
        "mlp1.3.weight": rand(TEXT_HIDDEN, PROJECTOR_HIDDEN, scale=0.1),
    }
    return weights


def _llm_weights(llm_config: dict[str, Any], tokenizer: Any, seed: int) -> dict[str, Any]:
    """Seeded random NemotronH weights in hub layout (``backbone.*``), prefixed ``language_model.``."""
    import torch
    from safetensors.torch import load_file
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**llm_config)).eval()
    with torch.no_grad():
        # Special and non-word tokens get zero logits, so output is word-like text.
        model.get_output_embeddings().weight[non_word_ids(tokenizer)] = 0
    with tempfile.TemporaryDirectory(prefix="nemotron-llm-") as tmp:
        model.save_pretrained(tmp)
        state = load_file(str(Path(tmp) / "model.safetensors"))
    return {f"language_model.{name}": tensor for name, tensor in state.items()}


def _write_nemotron(path: Path, seed: int, omni: bool, moe: bool = False) -> None:
    """Write config, remote-code config module, bf16 weights and tokenizer into ``path``."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tokenizer = _build_tokenizer(thinking=True)  # both: Nano v2 VL's "/no_think" system turn also opens <think></think>
    temporal_patch = 2 if omni else 1
    # Real layouts: Nano 12B v2 mixes Mamba (M), MLP (-) and attention (*);
    # Nano Omni 30B-A3B mixes Mamba, MoE (E) and attention.
    pattern = "M*EE" if moe else ("M*-M" if omni else "M-*-")
    llm_config = _llm_config(tokenizer, pattern=pattern, moe=moe)
    generator = torch.Generator().manual_seed(seed + 1)
    weights = _llm_weights(llm_config, tokenizer, seed) | _radio_weights(generator, temporal_patch)
    save_file(
        {name: t.to(torch.bfloat16).contiguous() for name, t in sorted(weights.items())},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )

    (path / "configuration_tiny_nemotron.py").write_text(_CONFIG_MODULE)
    config = {
        "architectures": [OMNI_ARCHITECTURE if omni else VL_ARCHITECTURE],
        "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {"AutoConfig": "configuration_tiny_nemotron.TinyNemotronVLConfig"},
        "dtype": "bfloat16",
        "llm_config": llm_config,
        "vision_config": _vision_config(temporal_patch, 1024 if omni else None),
        "force_image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "downsample_ratio": 0.5,
        "template": "nemotron-h-end" if not omni else "nemotron-3-omni",
        "ps_version": "v2",
        "image_tag_type": "internvl",
        "projector_hidden_size": PROJECTOR_HIDDEN,
        "vit_hidden_size": VIT_HIDDEN,
        "video_pruning_rate": 0.0,
        "norm_mean": NORM_MEAN,
        "norm_std": NORM_STD,
        "use_thumbnail": True,
        "img_context_token_id": token_id(tokenizer, "<image>"),
        "video_context_token_id": token_id(tokenizer, "<video>"),
        "eos_token_id": token_id(tokenizer, "<|im_end|>"),
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    GenerationConfig(
        bos_token_id=token_id(tokenizer, "<s>"),
        eos_token_id=[token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "</s>")],
        pad_token_id=token_id(tokenizer, "</s>"),
    ).save_pretrained(path)


def build_tiny_nemotron_vl(out_dir: str, seed: int = 0) -> str:
    """Build a tiny ``NemotronH_Nano_VL_V2`` (Nano 12B v2 VL layout) in ``out_dir``."""
    return build_once(out_dir, lambda path: _write_nemotron(path, seed, omni=False))


def build_tiny_nemotron_omni(out_dir: str, seed: int = 0, moe: bool = False) -> str:
    """Build a tiny ``NemotronH_Nano_Omni_Reasoning_V3`` (Nano Omni layout) in ``out_dir``.

    ``moe=True`` gives the real layout (Mamba + MoE + attention). vLLM's CPU
    build cannot run it: NemotronH experts are non-gated (relu2), and vLLM
    0.32 raises ``NotImplementedError: is_act_and_mul=False is supported only
    for CUDA, XPU and ROCm for now`` while building the model. The default
    (``moe=False``) swaps the MoE layers for plain MLP layers so that the rest
    of the Omni video path (2-frame tubelets, aspect-preserving frame resize,
    thinking chat template) runs on CPU.
    """
    return build_once(out_dir, lambda path: _write_nemotron(path, seed, omni=True, moe=moe))
