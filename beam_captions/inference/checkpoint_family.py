"""Does a checkpoint belong to the model family its flag names? Read from its ``config.json``, before any work.

A Qwen2.5-VL directory run as ``--captioning-algorithm nemotron`` would otherwise load with
``trust_remote_code`` on and caption with the wrong chat and frame sizes; a Nemotron directory run as
``qwen2.5`` fails deep inside vLLM. The command line compares the checkpoint's ``architectures`` (what
vLLM picks its model class by) with the family's table below and refuses a mismatch in one line.

The rule (``matches``): a config with ``architectures`` matches when one of them is in the family's
table; a config without them is judged by ``model_type``; a config with neither cannot be judged and
passes. ``model_type`` alone never decides when ``architectures`` is there: the Nemotron VL and Omni
checkpoints share ``model_type`` ``NemotronH_Nano_VL_V2`` but differ in architecture (and in how their
frames are sized).

Values: the real checkpoints' ``config.json`` as ``tiny_models`` and ``tiny_nemotron`` write them
(``tests/test_model_family_check.py`` reads them back); the Omni checkpoint's ``model_type`` is the tiny
builder's and only matters for a config without ``architectures``. The Qwen3 families also take their
MoE siblings (``Qwen3VLMoeForConditionalGeneration``, ``Qwen3MoeForCausalLM``): same processor and chat,
and vLLM runs them alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from beam_captions.inference.variants import CAPTION_FAMILIES, CAPTION_VARIANTS, caption_model, canonical_variant

__all__ = [
    "CAPTION_CHECKPOINTS",
    "ENHANCE_CHECKPOINTS",
    "CheckpointKind",
    "caption_mismatch",
    "describe",
    "enhance_mismatch",
    "matches",
    "read_config",
]


@dataclass(frozen=True)
class CheckpointKind:
    """What a family's ``config.json`` says: its ``architectures`` (any one) and ``model_type`` values."""

    architectures: tuple[str, ...]
    model_types: tuple[str, ...]

    def describe(self) -> str:
        return f"{' or '.join(self.architectures)} ({' or '.join(self.model_types)})"


# Keyed by ``variants.CaptionFamily.name``.
CAPTION_CHECKPOINTS: dict[str, CheckpointKind] = {
    "qwen2.5": CheckpointKind(("Qwen2_5_VLForConditionalGeneration",), ("qwen2_5_vl",)),
    "qwen3": CheckpointKind(("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
                            ("qwen3_vl", "qwen3_vl_moe")),
    "nemotron-vl": CheckpointKind(("NemotronH_Nano_VL_V2",), ("NemotronH_Nano_VL_V2",)),
    "nemotron-omni": CheckpointKind(("NemotronH_Nano_Omni_Reasoning_V3",), ("NemotronH_Nano_VL_V2",)),
}
# Keyed by ``variants.canonical_variant`` of ``--enhance-captions-algorithm``.
ENHANCE_CHECKPOINTS: dict[str, CheckpointKind] = {
    "qwen2.5": CheckpointKind(("Qwen2ForCausalLM",), ("qwen2",)),
    "qwen3": CheckpointKind(("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), ("qwen3", "qwen3_moe")),
}
assert set(CAPTION_CHECKPOINTS) == set(CAPTION_FAMILIES), "every caption family needs its checkpoint kind"


def _architectures(config: Mapping[str, Any]) -> tuple[str, ...]:
    found = config.get("architectures")
    if isinstance(found, str):
        found = [found]
    return tuple(a for a in found if isinstance(a, str)) if isinstance(found, (list, tuple)) else ()


def _model_type(config: Mapping[str, Any]) -> Optional[str]:
    found = config.get("model_type")
    return found if isinstance(found, str) and found else None


def matches(config: Mapping[str, Any], kind: CheckpointKind) -> Optional[bool]:
    """Whether ``config`` is a checkpoint of ``kind``; ``None`` when it names neither architecture nor type."""
    architectures = _architectures(config)
    if architectures:
        return any(a in kind.architectures for a in architectures)
    model_type = _model_type(config)
    return None if model_type is None else model_type in kind.model_types


def describe(config: Mapping[str, Any]) -> str:
    """``Qwen2_5_VLForConditionalGeneration (qwen2_5_vl)``: what a ``config.json`` says it is."""
    architectures = " or ".join(_architectures(config)) or "unnamed-architecture"
    return f"{architectures} ({_model_type(config) or 'no model_type'})"


def _mismatch(
    config: Mapping[str, Any], location: str, flag: str, algorithm_flag: str, algorithm: str,
    expected: CheckpointKind, suggestions: dict[str, CheckpointKind], names: dict[str, str],
    other_role: tuple[dict[str, CheckpointKind], str],
) -> Optional[str]:
    if matches(config, expected) is not False:
        return None
    fitting = [names[key] for key, kind in suggestions.items() if matches(config, kind)]
    if fitting:
        hint = f"pass {algorithm_flag} {fitting[0]}"
    elif any(matches(config, kind) for kind in other_role[0].values()):
        hint = f"no {algorithm_flag} runs it (it belongs to {other_role[1]})"
    else:
        hint = f"no {algorithm_flag} runs it"
    return (f"{flag} {location} holds a {describe(config)} checkpoint, but {algorithm_flag} {algorithm} "
            f"expects {expected.describe()}; {hint}")


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def caption_mismatch(config: Mapping[str, Any], algorithm: str, location: str, flag: str = "--model-dir") -> Optional[str]:
    """The one-line refusal when ``config`` is not a checkpoint of ``--captioning-algorithm algorithm``'s family, else None."""
    names = {family: _either([v.variant for v in CAPTION_VARIANTS.values() if v.family.name == family])
             for family in CAPTION_CHECKPOINTS}
    return _mismatch(config, location, flag, "--captioning-algorithm", algorithm,
                     CAPTION_CHECKPOINTS[caption_model(algorithm).family.name], CAPTION_CHECKPOINTS, names,
                     (ENHANCE_CHECKPOINTS, "--enhance-captions-model-dir"))


def enhance_mismatch(
    config: Mapping[str, Any], algorithm: str, location: str, flag: str = "--enhance-captions-model-dir"
) -> Optional[str]:
    """The one-line refusal when ``config`` is not a checkpoint of ``--enhance-captions-algorithm algorithm``, else None."""
    return _mismatch(config, location, flag, "--enhance-captions-algorithm", algorithm,
                     ENHANCE_CHECKPOINTS[canonical_variant(algorithm)], ENHANCE_CHECKPOINTS,
                     {name: name for name in ENHANCE_CHECKPOINTS}, (CAPTION_CHECKPOINTS, "--model-dir"))


def read_config(uri: str) -> Optional[dict[str, Any]]:
    """The ``config.json`` under the model location ``uri``: a local directory, or one small read under a
    ``gs://`` (any Beam file system) prefix. ``None`` when there is none (a directory still to be
    downloaded into) or a remote one cannot be read now (the worker's copy reports that). Raises
    ``ValueError`` (one line) for a ``config.json`` that cannot be read or is not a JSON object."""
    from beam_captions.io.paths import is_local, local_path

    if is_local(uri):
        path = os.path.join(local_path(uri), "config.json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise ValueError(f"cannot read {path} ({error.strerror or error})") from None
    else:
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        path = uri.rstrip("/") + "/config.json"
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
        except Exception:  # noqa: BLE001 - no access or no network now: not this check's to report
            return None
    try:
        config = json.loads(data.decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError both
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config
