"""Keyword counts of "transition thoughts" and "reflection thoughts" in a response.

The PreRL paper (arXiv 2604.14142, appendix B.3, Table 7) counts both with keyword rules, but its
table could not be retrieved when this module was written, so these lists are NOT the paper's:

- ``REFLECTION_KEYWORDS``: the self-reflection keyword pool of Liu et al. 2025, "Understanding
  R1-Zero-Like Training" (sail-sg/oat-zero, ``analysis/eval_self_reflect.py`` and its
  ``keyword_count`` pool: recheck, rethink, reassess, reevaluate, re-evaluate, reevaluation,
  re-examine, reexamine, reconsider, reanalyze, double-check, check again, think again,
  verify again, go over the steps; Z. Liu also co-authors PreRL), plus the verification phrases
  verify, check, confirm, make sure and "let me re-".
- ``TRANSITION_KEYWORDS``: markers of switching to another line of thought, after the
  "thought switch" markers of Wang et al. 2025, "Thoughts Are All Over the Place" ("alternatively")
  and common practice: but, wait, alternatively, however, instead, on the other hand,
  another approach, another way.

Matching is case-insensitive on word boundaries; whitespace inside a phrase matches any run of
whitespace. Each occurrence counts once; where phrases overlap the longest wins at the earliest
position ("double-check" is one reflection, not also a "check").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["REFLECTION_KEYWORDS", "TRANSITION_KEYWORDS", "ThoughtCounts", "count_keywords", "count_thoughts"]

TRANSITION_KEYWORDS: tuple[str, ...] = (
    "but",
    "wait",
    "alternatively",
    "however",
    "instead",
    "on the other hand",
    "another approach",
    "another way",
)

REFLECTION_KEYWORDS: tuple[str, ...] = (
    "recheck",
    "rethink",
    "reassess",
    "reevaluate",
    "re-evaluate",
    "reevaluation",
    "re-examine",
    "reexamine",
    "reconsider",
    "reanalyze",
    "double-check",
    "check again",
    "think again",
    "verify again",
    "go over the steps",
    "verify",
    "check",
    "confirm",
    "make sure",
    "let me re-",
)


@dataclass(frozen=True)
class ThoughtCounts:
    """Keyword occurrences in one response."""

    transition: int
    reflection: int


@lru_cache(maxsize=32)
def _pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    parts = []
    for phrase in sorted(keywords, key=len, reverse=True):
        body = r"\s+".join(re.escape(word) for word in phrase.split())
        start = r"\b" if phrase[0].isalnum() else ""
        end = r"\b" if phrase[-1].isalnum() else ""
        parts.append(start + body + end)
    return re.compile("|".join(parts), re.IGNORECASE)


def count_keywords(text: str, keywords: Sequence[str]) -> int:
    """Occurrences of ``keywords`` in ``text`` (case-insensitive, word boundaries, no overlaps)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words = tuple(keywords)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"keywords must be non-empty strings, got {keywords!r}")
    return sum(1 for _ in _pattern(words).finditer(text))


def count_thoughts(
    text: str,
    transition: Sequence[str] = TRANSITION_KEYWORDS,
    reflection: Sequence[str] = REFLECTION_KEYWORDS,
) -> ThoughtCounts:
    """Transition and reflection keyword counts of one response."""
    return ThoughtCounts(count_keywords(text, transition), count_keywords(text, reflection))
