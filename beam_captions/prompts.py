"""Every prompt the pipeline sends to a model, in one place."""

from __future__ import annotations

from typing import Optional

__all__ = [
    "CAPTION_PROMPTS",
    "ENHANCE_PROMPTS",
    "STAGE2_INSTRUCTION",
    "caption_prompt",
    "stage2_prompt",
    "enhance_prompt",
]

CAPTION_PROMPTS: dict[str, str] = {
    "default": (
        "Describe this video clip in detail. Cover the setting, the people, animals and objects in it, "
        "what each of them does and how this changes over time, the camera's movement and framing, the "
        "lighting and colours, and any story or mood the clip conveys. Write flowing prose, not a list."
    ),
    "av": (
        "This clip was recorded by a camera mounted on a moving car. Describe how the ego car moves "
        "(speed changes, turns, lane changes, stops) and how the other vehicles, cyclists and pedestrians "
        "around it move. Mention lane markings, traffic signs and signals and their states, road layout, "
        "weather and lighting, notable landmarks, and any aggressive, unsafe or unusual driving."
    ),
    "av-surveillance": (
        "This clip comes from a fixed traffic surveillance camera. Describe the scene and the road layout, "
        "then how vehicles, cyclists and pedestrians move through it over time. Mention traffic signals and "
        "their states, signs and lane markings, weather and lighting, and any event that matters for "
        "safety: near misses, collisions, sudden braking, red-light running or aggressive driving."
    ),
}

STAGE2_INSTRUCTION = (
    "Below is a first description of this video. Watch the video again and rewrite the description so "
    "that it is accurate and complete: correct anything the video contradicts, add important details "
    "that are missing, and keep the order in which things happen.\n\nFirst description:\n"
)

ENHANCE_PROMPTS: dict[str, str] = {
    "default": (
        "You improve captions of video clips. Rewrite the caption you are given into a richer, longer "
        "description: keep every fact it states, add vivid detail about colours, textures, motion, "
        "atmosphere and the relations between subjects, and never invent events that contradict it. "
        "Answer with the new caption only."
    ),
    "av": (
        "You improve captions of dash-camera clips recorded from a driving car. Rewrite the caption you "
        "are given with more detail on the ego car's manoeuvres, surrounding traffic, road users, lane "
        "markings, signs and signals, keeping every fact it states. End with a one-sentence summary of "
        "the driving situation. Answer with the new caption only."
    ),
    "av-surveillance": (
        "You improve captions of traffic clips from dash cameras and fixed surveillance cameras. Rewrite "
        "the caption you are given with more detail on vehicles, pedestrians, road layout, signals and "
        "any safety-relevant events, keeping every fact it states. End with a short summary of what "
        "happened. Answer with the new caption only."
    ),
}


def _choose(table: dict[str, str], kind: str, variant: str, text: Optional[str]) -> str:
    if text:
        return text
    if variant not in table:
        raise ValueError(f"unknown {kind} prompt variant {variant!r}; choose one of {', '.join(table)}")
    return table[variant]


def caption_prompt(variant: str = "default", text: Optional[str] = None) -> str:
    """The stage-1 caption prompt: ``text`` when given, else the variant's prompt."""
    return _choose(CAPTION_PROMPTS, "caption", variant, text)


def stage2_prompt(stage1_caption: str, instruction: Optional[str] = None) -> str:
    """The stage-2 prompt: a refinement instruction followed by the stage-1 caption."""
    return f"{instruction or STAGE2_INSTRUCTION}{stage1_caption}"


def enhance_prompt(variant: str = "default", text: Optional[str] = None) -> str:
    """The enhancement system prompt: ``text`` when given, else the variant's prompt."""
    return _choose(ENHANCE_PROMPTS, "enhancement", variant, text)
