"""The MATH dataset's published answer check (Hendrycks et al., 2021), the reward the paper's authors trained with.

Written here from its published rules. Both strings go through the same normalization and are then compared as
strings:

1. drop line breaks and ``\\!``; ``\\\\`` becomes ``\\``; ``tfrac``/``dfrac`` become ``frac``;
2. drop ``\\left``, ``\\right``, degree marks (``^{\\circ}``, ``^\\circ``) and ``\\$``;
3. units: when ``"\\text{ "`` (with its space) occurs once, everything from it on is dropped;
4. drop ``\\%``; ``" ."`` and ``"{."`` become ``" 0."`` and ``"{0."``; a leading ``.`` gets a ``0``;
5. ``k = v`` with a left side of at most 2 characters becomes ``v``;
6. ``\\sqrt3`` becomes ``\\sqrt{3}``; spaces are removed; ``\\frac12`` / ``\\frac1{72}`` get their braces;
7. exactly ``0.5`` becomes ``\\frac{1}{2}``; ``a/b`` of two integers becomes ``\\frac{a}{b}``.

When the rules cannot apply (``"\\text{ "`` twice, a string ending in ``\\sqrt`` or ``\\frac``) the published
check compares the raw strings, and so does this one. It has no trailing-``.0`` rule and no numeric comparison:
``27.0`` vs ``27`` and ``0.25`` vs ``\\frac{1}{4}`` are *wrong* here (math-verify accepts both), so more samples
are negative. The answer is the last complete box found by :func:`~dsrl_fast.reward.extract.extract_boxed`, the
authors' rule (``\\boxed12}`` and ``\\fbox{}`` are no answer; its docstring lists where it reads well-formed LaTeX
more carefully than their string code). By default Unicode math is first rewritten as LaTeX
(:func:`~dsrl_fast.reward.normalize.normalize_unicode`); ``unicode=False`` gives the published check exactly.
Checks are pure string operations, linear in the answer length (answers are capped by ``extract_boxed``), so
they run in the calling thread without a time limit.
"""

from __future__ import annotations

from dsrl_fast.reward.base import Outcome, RewardStats, check_batch
from dsrl_fast.reward.extract import extract_boxed
from dsrl_fast.reward.normalize import normalize_unicode

__all__ = ["HendrycksMathReward", "hendrycks_equiv", "hendrycks_normalize"]


class _RulesDoNotApply(Exception):
    """The published rules raise on this string; the check falls back to comparing raw strings."""


def _units_dropped(s: str) -> str:
    parts = s.split("\\text{ ")
    if len(parts) > 2:
        raise _RulesDoNotApply
    return parts[0]


def _braced_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    out = [head]
    for piece in rest:
        if not piece:
            raise _RulesDoNotApply
        out.append("\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:]))
    return "".join(out)


def _braced_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    out = [head]
    for piece in rest:
        if not piece:
            raise _RulesDoNotApply
        if piece[0] == "{":
            out.append("\\frac" + piece)
            continue
        if len(piece) < 2:
            return s
        a, b, tail = piece[0], piece[1], piece[2:]
        out.append("\\frac{" + a + "}" + ("{" + b + "}" if b != "{" else b) + tail)
    return "".join(out)


def _slash_as_frac(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def hendrycks_normalize(s: str) -> str:
    """The published normalization (rules 1-7 of the module docstring); raises _RulesDoNotApply where it fails."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _units_dropped(s)
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_as_frac(s)


def hendrycks_equiv(answer: str, reference: str) -> bool:
    """The published ``is_equiv``: equal after :func:`hendrycks_normalize`, else (rules failed) equal raw strings."""
    try:
        return hendrycks_normalize(answer) == hendrycks_normalize(reference)
    except _RulesDoNotApply:
        return answer == reference


class HendrycksMathReward:
    """Reward 1.0 when the last boxed answer is :func:`hendrycks_equiv` to the reference.

    Args:
        unicode: rewrite Unicode math as LaTeX in both strings first (False: the published check exactly).

    ``last_stats`` holds the :class:`~dsrl_fast.reward.base.RewardStats` of the last call (``no_answer``: no
    complete final box; this check never times out or errs).
    """

    def __init__(self, unicode: bool = True):
        if not isinstance(unicode, bool):
            raise TypeError(f"unicode must be a bool, got {type(unicode).__name__}")
        self.unicode = unicode
        self.last_stats = RewardStats()

    def outcomes(self, responses: list[str], references: list[str]) -> list[Outcome]:
        """The :class:`~dsrl_fast.reward.base.Outcome` of each response."""
        check_batch(responses, references)
        out = []
        for response, reference in zip(responses, references, strict=True):
            answer = extract_boxed(response)
            if answer is None:
                out.append(Outcome.NO_ANSWER)
                continue
            if self.unicode:
                answer, reference = normalize_unicode(answer), normalize_unicode(reference)
            out.append(Outcome.CORRECT if hendrycks_equiv(answer, reference) else Outcome.WRONG)
        return out

    def __call__(self, responses: list[str], references: list[str]) -> list[float]:
        outcomes = self.outcomes(responses, references)
        self.last_stats = RewardStats.from_outcomes(outcomes)
        return [float(o == Outcome.CORRECT) for o in outcomes]
