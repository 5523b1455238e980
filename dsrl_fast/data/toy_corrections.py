"""A second embedded toy task: three-number sums worked in steps, with occasional self-corrections.

Prompt ``"Compute a+b+c."``, reference answer ``"S"`` (S = a+b+c). The supervised trace takes two steps
separated by blank lines, so the thought taxonomy (:mod:`dsrl_fast.eval.thoughts`) sees one reasoning step
per line::

    a+b=X                      a+b=X'                     a+b=X'
                               Wait, a+b=X                Alternatively, b+c=Z
    X+c=S                      X+c=S                      a+Z=S
    \\boxed{S}                  \\boxed{S}                  \\boxed{S}

Most traces are the plain two steps (left). In a share of them (``correction_rate``) the first sum is written
wrong (off by 1 or 10) and then fixed, either by a reflection (a step starting with "Wait", middle) or by a
transition to the other grouping (a step starting with "Alternatively", right; ``transition_share`` of the
corrections). A model warmed up on these traces has reflection and transition steps to emit or drop, and its
wrong paths (a wrong first sum kept) to prune, which the addition toy (:mod:`dsrl_fast.data.toy`, one line) lacks.

The tokenizer is word level like the addition toy's (digits are tokens, and so are "Wait", "Alternatively",
"\\n\\n"); the model is :func:`dsrl_fast.model.tiny.build_tiny_qwen3` over this vocabulary. Prompt plus the longest trace
is 49 tokens, inside the tiny model's 64 positions. Warm up with
``supervised_warmup(..., target=correction_target)``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from dsrl_fast.data.problems import Problem
from dsrl_fast.data.toy import BOS, EOS, IM_START, PAD, UNK, word_level_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CORRECTIONS_VOCAB",
    "build_corrections_tokenizer",
    "correction_target",
    "make_correction_problems",
]

_SPECIAL = (PAD, UNK, BOS, EOS, IM_START)
_WORDS = tuple("0123456789") + ("+", "=", ".", ",", " ", "\n\n", "Compute", "Wait", "Alternatively", "\\boxed{", "}")
CORRECTIONS_VOCAB: tuple[str, ...] = _SPECIAL + _WORDS
_PIECE_PATTERN = r"\\boxed\{|Compute|Wait|Alternatively|\n\n|\d|[+=.,} ]"
# How far a wrong first sum is off: a dropped carry (10) or a slipped unit (1).
_SLIPS = (-10, -1, 1, 10)


def build_corrections_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of this task (26 tokens; ids follow :data:`CORRECTIONS_VOCAB`).

    Same conventions as :func:`dsrl_fast.data.toy.build_toy_tokenizer`: special tokens first (``<|im_start|>`` is
    the marginal-space context token), ``decode(encode(text)) == text`` for text made of the vocabulary, and
    encoding with ``add_special_tokens=True`` prepends ``<bos>``.
    """
    return word_level_tokenizer(CORRECTIONS_VOCAB, _PIECE_PATTERN)


def _trace(a: int, b: int, c: int, rng: random.Random, correction_rate: float, transition_share: float) -> str:
    """One supervised trace of ``a+b+c`` (see the module docstring); draws from ``rng`` in a fixed order."""
    first, total = a + b, a + b + c
    corrected, as_transition, slip = rng.random() < correction_rate, rng.random() < transition_share, rng.choice(_SLIPS)
    last = f"\\boxed{{{total}}}"
    if not corrected:
        return f"{a}+{b}={first}\n\n{first}+{c}={total}\n\n{last}"
    wrong = first + slip if first + slip >= 0 else first + 1
    if as_transition:
        return f"{a}+{b}={wrong}\n\nAlternatively, {b}+{c}={b + c}\n\n{a}+{b + c}={total}\n\n{last}"
    return f"{a}+{b}={wrong}\n\nWait, {a}+{b}={first}\n\n{first}+{c}={total}\n\n{last}"


def make_correction_problems(
    n: int,
    seed: int = 0,
    low: int = 10,
    high: int = 49,
    *,
    correction_rate: float = 0.3,
    transition_share: float = 0.3,
) -> list[Problem]:
    """``n`` distinct problems ``"Compute a+b+c."`` with ``a, b, c`` uniform in ``[low, high]`` and their traces.

    The order is a seeded shuffle of all triples, so slicing one list gives disjoint splits. Each problem's
    ``meta`` holds ``{"a", "b", "c", "target"}``; ``target`` is its supervised trace, corrected with probability
    ``correction_rate`` (by a transition with probability ``transition_share``, else by a reflection). The same
    arguments give the same problems and traces.
    """
    for name, value in (("n", n), ("seed", seed), ("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    for name, rate in (("correction_rate", correction_rate), ("transition_share", transition_share)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {rate!r}")
    if not 0 <= low <= high:
        raise ValueError(f"low and high must satisfy 0 <= low <= high, got low={low}, high={high}")
    span = high - low + 1
    if not 1 <= n <= span**3:
        raise ValueError(f"n must be in [1, {span**3}] (distinct triples in [{low}, {high}]^3), got {n}")
    rng = random.Random(seed)
    problems = []
    for k in rng.sample(range(span**3), n):
        a, b, c = low + k // span**2, low + k // span % span, low + k % span
        target = _trace(a, b, c, rng, correction_rate, transition_share)
        problems.append(Problem(f"Compute {a}+{b}+{c}.", str(a + b + c), {"a": a, "b": b, "c": c, "target": target}))
    return problems


def correction_target(problem: Problem) -> str:
    """The supervised trace of a problem from :func:`make_correction_problems` (EOS is appended at tokenization)."""
    if not isinstance(problem, Problem) or not isinstance(problem.meta.get("target"), str):
        raise ValueError(f"problem must be a Problem from make_correction_problems (meta target), got {problem!r}")
    return problem.meta["target"]
