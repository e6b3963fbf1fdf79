"""Sanity flags for model captions: the failures a curator must be able to filter out.

A caption is flagged ``empty`` (nothing but whitespace), ``repetition`` (a loop of one
repeated unit covers most of it), ``truncated`` (generation stopped at the token limit),
``refusal`` (the model declined instead of describing) or ``reasoning_only`` (empty, while the
model wrote reasoning: all its text was in a ``<think>`` block). Flags never drop a caption.

Repetition measure: for every period ``p`` (1 to 25 words; separately 1 to 40 characters,
for run-together text) every run where each unit equals the one ``p`` before it, plus its
first period, is a loop when it repeats its unit at least three times. The caption is
flagged when loops cover at least half of it (in words or in characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["FLAGS", "CaptionCheck", "check_caption", "loop_coverage", "is_refusal", "better_caption"]

FLAGS = ("empty", "repetition", "truncated", "refusal", "reasoning_only")
MIN_COVERAGE = 0.5
MIN_REPEATS = 3
_WORD = re.compile(r"\w+|[^\w\s]")
_REFUSAL = re.compile(
    r"^\W*(?:sorry[,.!]?\s*)?(?:i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:cannot|can't|can\s*not|won't)"
    r"|unfortunately,?\s+i\s+(?:cannot|can't|am unable))"
    r"|\bas an ai(?: language)? model\b|\bi (?:cannot|can't) (?:assist|help) with\b",
    re.IGNORECASE,
)


def _loop_mask(units: Sequence[str], max_period: int) -> list[bool]:
    """Which units belong to a loop: a run of at least ``MIN_REPEATS`` copies of one unit sequence."""
    covered = [False] * len(units)
    for period in range(1, min(max_period, len(units) // MIN_REPEATS) + 1):
        run = 0
        for i in range(period, len(units) + 1):
            if i < len(units) and units[i] == units[i - period]:
                run += 1
                continue
            if run + period >= MIN_REPEATS * period:  # the run ended at i - 1: mark it with its first copy
                for j in range(i - run - period, i):
                    covered[j] = True
            run = 0
    return covered


def _share(units: Sequence[str], max_period: int) -> float:
    return sum(_loop_mask(units, max_period)) / len(units)


def loop_coverage(text: str) -> float:
    """Share of ``text`` (in words, or in characters for run-together text) that sits inside loops."""
    words = _WORD.findall(text.lower())
    word_share = _share(words, 25) if len(words) >= 6 else 0.0
    chars = re.sub(r"\s+", "", text.lower())
    char_share = _share(chars, 40) if len(chars) >= 24 else 0.0
    return max(word_share, char_share)


def is_refusal(text: str) -> bool:
    """The caption opens with a refusal or speaks as an AI model instead of describing the video."""
    return bool(_REFUSAL.search(text[:300]))


@dataclass(frozen=True)
class CaptionCheck:
    """What we know about one generated caption."""

    num_tokens: int
    finish_reason: Optional[str]
    flags: tuple[str, ...]

    @property
    def sound(self) -> bool:
        return not self.flags


def check_caption(text: Optional[str], num_tokens: int = 0, finish_reason: Optional[str] = None,
                  reasoning: bool = False) -> CaptionCheck:
    """Flags of ``text``; ``finish_reason`` ``"length"`` (vLLM's) means it hit the token limit; ``reasoning``:
    the model wrote reasoning besides ``text`` (with an empty ``text``: ``reasoning_only``)."""
    text = text or ""
    flags = []
    if not text.strip():
        flags.append("empty")
        if reasoning:
            flags.append("reasoning_only")
    elif loop_coverage(text) >= MIN_COVERAGE:
        flags.append("repetition")
    if finish_reason == "length":
        flags.append("truncated")
    if text.strip() and is_refusal(text):
        flags.append("refusal")
    return CaptionCheck(num_tokens, finish_reason, tuple(flags))


_SEVERITY = {"empty": 8, "repetition": 4, "refusal": 2, "truncated": 1, "reasoning_only": 0}  # with empty, always


def better_caption(first: CaptionCheck, second: CaptionCheck) -> bool:
    """Whether a retried caption (``second``) beats the first: lower flag severity, ties keep the first."""
    return sum(_SEVERITY[f] for f in second.flags) < sum(_SEVERITY[f] for f in first.flags)
