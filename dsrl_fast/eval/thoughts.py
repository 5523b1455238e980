"""The PreRL paper's thought taxonomy (arXiv 2604.14142, appendix B.3, Table 7).

A response is split into reasoning steps on blank lines (``"\\n\\n"``); each step gets exactly one
label, matched case-insensitively, transition checked before reflection:

- ``"transition"``: the step *starts with* "Alternatively", or *contains* "think differently",
  "another way", "another approach", "another method", "another solution", "another strategy" or
  "another technique";
- ``"reflection"``: the step *starts with* "Wait", or *contains* "verify", "make sure", "hold on",
  "think again", "'s correct", "'s incorrect", "Let me check" or "seems right";
- ``"execution"``: every other step.

Matching is plain substring matching as in the paper (no word boundaries: "verify" also matches
"verifying"). Steps are stripped of surrounding whitespace, and steps left empty (three or more
newlines in a row) are not steps. The paper reports each label's share of all steps; other keyword
lists can be given as a :class:`ThoughtRules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "PAPER_RULES",
    "THOUGHT_LABELS",
    "ThoughtCounts",
    "ThoughtRules",
    "classify_response",
    "classify_step",
    "count_thoughts",
    "split_steps",
]

THOUGHT_LABELS: tuple[str, ...] = ("transition", "reflection", "execution")


def _check_phrases(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of str, got {type(value).__name__}")
    if not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"{name} must hold non-empty strings, got {value!r}")
    return tuple(p.lower() for p in value)


@dataclass(frozen=True)
class ThoughtRules:
    """Keyword rules of the taxonomy; a step whose lowercased text starts with a prefix or contains a phrase
    gets that label (transition rules first). Stored lowercased."""

    transition_prefixes: tuple[str, ...]
    transition_phrases: tuple[str, ...]
    reflection_prefixes: tuple[str, ...]
    reflection_phrases: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("transition_prefixes", "transition_phrases", "reflection_prefixes", "reflection_phrases"):
            object.__setattr__(self, name, _check_phrases(name, getattr(self, name)))


PAPER_RULES = ThoughtRules(
    transition_prefixes=("Alternatively",),
    transition_phrases=("think differently", "another way", "another approach", "another method",
                        "another solution", "another strategy", "another technique"),
    reflection_prefixes=("Wait",),
    reflection_phrases=("verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect",
                        "Let me check", "seems right"),
)


@dataclass(frozen=True)
class ThoughtCounts:
    """Steps per label in one or more responses (``a + b`` pools counts)."""

    transition: int = 0
    reflection: int = 0
    execution: int = 0

    @property
    def steps(self) -> int:
        """All steps."""
        return self.transition + self.reflection + self.execution

    def shares(self) -> dict[str, float]:
        """{label: share of all steps}; every share is 0.0 when there are no steps."""
        total = self.steps
        return {label: (getattr(self, label) / total if total else 0.0) for label in THOUGHT_LABELS}

    def __add__(self, other: ThoughtCounts) -> ThoughtCounts:
        if not isinstance(other, ThoughtCounts):
            return NotImplemented
        return ThoughtCounts(self.transition + other.transition, self.reflection + other.reflection,
                             self.execution + other.execution)


def split_steps(text: str) -> list[str]:
    """The reasoning steps of ``text``: pieces between ``"\\n\\n"``, stripped, empty pieces dropped."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return [piece.strip() for piece in text.split("\n\n") if piece.strip()]


def _matches(step: str, prefixes: tuple[str, ...], phrases: tuple[str, ...]) -> bool:
    return step.startswith(prefixes) or any(p in step for p in phrases)


def classify_step(step: str, rules: ThoughtRules = PAPER_RULES) -> str:
    """"transition", "reflection" or "execution" for one step (leading whitespace ignored)."""
    if not isinstance(step, str):
        raise TypeError(f"step must be a str, got {type(step).__name__}")
    if not isinstance(rules, ThoughtRules):
        raise TypeError(f"rules must be a ThoughtRules, got {type(rules).__name__}")
    lowered = step.strip().lower()
    if _matches(lowered, rules.transition_prefixes, rules.transition_phrases):
        return "transition"
    if _matches(lowered, rules.reflection_prefixes, rules.reflection_phrases):
        return "reflection"
    return "execution"


def classify_response(text: str, rules: ThoughtRules = PAPER_RULES) -> list[str]:
    """The label of each step of ``text``, in order."""
    return [classify_step(step, rules) for step in split_steps(text)]


def count_thoughts(texts: str | Iterable[str], rules: ThoughtRules = PAPER_RULES) -> ThoughtCounts:
    """Steps per label of one response, or pooled over several."""
    labels = classify_response(texts, rules) if isinstance(texts, str) else [
        label for text in texts for label in classify_response(text, rules)]
    return ThoughtCounts(*(labels.count(label) for label in THOUGHT_LABELS))
