"""Sanity flags for model captions: the failures a curator must be able to filter out.

A caption is flagged ``empty`` (nothing but whitespace), ``repetition`` (a loop of one
repeated unit covers most of it), ``truncated`` (generation stopped at the token limit)
or ``refusal`` (the model declined instead of describing). Flags never drop a caption.

Repetition measure: for every period ``p`` (1 to 25 words, and 1 to 40 characters for
texts without spaces) find the longest run where each unit equals the one ``p`` before
it. The run plus its first period is the loop; the caption is flagged when one loop
covers at least half of the text and repeats its unit at least three times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["FLAGS", "CaptionCheck", "check_caption", "loop_coverage", "is_refusal", "better_caption"]

FLAGS = ("empty", "repetition", "truncated", "refusal")
MIN_COVERAGE = 0.5
MIN_REPEATS = 3
_WORD = re.compile(r"\w+|[^\w\s]")
_REFUSAL = re.compile(
    r"^\W*(?:sorry[,.!]?\s*)?(?:i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:cannot|can't|can\s*not|won't)"
    r"|unfortunately,?\s+i\s+(?:cannot|can't|am unable))"
    r"|\bas an ai(?: language)? model\b|\bi (?:cannot|can't) (?:assist|help) with\b",
    re.IGNORECASE,
)


def _longest_loop(units: Sequence[str], max_period: int) -> tuple[int, int]:
    """(units covered, period) of the longest periodic run in ``units``."""
    best = (0, 1)
    for period in range(1, min(max_period, len(units) // MIN_REPEATS) + 1):
        run = 0
        for i in range(period, len(units)):
            run = run + 1 if units[i] == units[i - period] else 0
            if run + period > best[0] and (run + period) >= MIN_REPEATS * period:
                best = (run + period, period)
    return best


def loop_coverage(text: str) -> float:
    """Share of ``text`` (in words, or characters when it has few words) covered by one repeated loop."""
    words = _WORD.findall(text.lower())
    if len(words) >= 6:
        covered, _ = _longest_loop(words, 25)
        word_share = covered / len(words)
    else:
        word_share = 0.0
    chars = re.sub(r"\s+", "", text.lower())
    char_share = _longest_loop(chars, 40)[0] / len(chars) if len(chars) >= 24 else 0.0
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


def check_caption(text: Optional[str], num_tokens: int = 0, finish_reason: Optional[str] = None) -> CaptionCheck:
    """Flags of ``text``; ``finish_reason`` ``"length"`` (vLLM's) means it hit the token limit."""
    text = text or ""
    flags = []
    if not text.strip():
        flags.append("empty")
    elif loop_coverage(text) >= MIN_COVERAGE:
        flags.append("repetition")
    if finish_reason == "length":
        flags.append("truncated")
    if text.strip() and is_refusal(text):
        flags.append("refusal")
    return CaptionCheck(num_tokens, finish_reason, tuple(flags))


_SEVERITY = {"empty": 8, "repetition": 4, "refusal": 2, "truncated": 1}


def better_caption(first: CaptionCheck, second: CaptionCheck) -> bool:
    """Whether a retried caption (``second``) beats the first: lower flag severity, ties keep the first."""
    return sum(_SEVERITY[f] for f in second.flags) < sum(_SEVERITY[f] for f in first.flags)
