"""The math-verify reward: the last boxed answer checked for mathematical equivalence with the reference.

Order of decisions for one response (the first that applies):

1. no complete final box (:func:`~dsrl_fast.reward.extract.extract_boxed`): NO_ANSWER;
2. equal after light normalization, or equal plain decimals (exact, :func:`answers_match_fast`): CORRECT,
   without starting sympy;
3. both plain decimals but different numbers: WRONG, decided exactly here (math-verify never sees two huge
   numbers it would have to parse);
4. otherwise math-verify in a :class:`~dsrl_fast.reward.pool.CheckPool` worker under the time limit.

Unicode math in both strings is rewritten as LaTeX first (:func:`normalize_unicode`). math-verify's own timeouts
use SIGALRM (main thread only), so they are off and the pool enforces the limit: this reward works from any thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Self

from dsrl_fast.reward.base import MalformedAnswer, Outcome, RewardStats, check_batch
from dsrl_fast.reward.extract import extract_boxed
from dsrl_fast.reward.normalize import (
    UNESCAPED_DOLLAR_RE,
    answers_match_fast,
    canonical_decimal,
    normalize_answer,
    normalize_unicode,
)
from dsrl_fast.reward.pool import DEFAULT_START_METHOD, CheckPool, StartMethod

__all__ = ["MathVerifyReward", "math_verify_check"]

# Each worker checks these before its first timed check: sympy's first polynomial, set, interval, matrix and
# equation comparisons import modules lazily (0.6 s for the first polynomial), which would eat a check's limit.
_WARM_UP = (("0", "0"), ("x^2+2x+1", "(x+1)^2"), ("\\{2,1\\}", "\\{1,2\\}"), ("[0,1)", "[0, 1)"),
            ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"), ("x=3", "3"))


def math_verify_check(answer: str, reference: str) -> bool:
    """math-verify equivalence of two answer strings, with its signal-based timeouts off.

    Raises ValueError when the reference cannot be parsed (a data problem: counted as a reward error) and
    MalformedAnswer when the answer cannot be parsed.
    """
    from math_verify import parse, verify

    def boxed(s: str) -> str:
        return "\\boxed{" + UNESCAPED_DOLLAR_RE.sub("", s) + "}"

    gold = parse(boxed(reference), parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference {reference[:200]!r}")
    pred = parse(boxed(answer), parsing_timeout=None)
    if not pred:
        raise MalformedAnswer(f"math-verify cannot parse the answer {answer[:200]!r}")
    return bool(verify(gold, pred, timeout_seconds=None))


class MathVerifyReward:
    """Reward 1.0 when the last boxed answer is math-verify-equivalent to the reference.

    Args:
        timeout_s: time limit of one check; a check past it is killed and scores 0.0 (counted as a timeout).
        num_workers: worker processes (default ``min(4, cpu_count)``).
        fast_path: decide answers that match by :func:`answers_match_fast`, and pairs of plain decimals, without
            sympy.
        check: the equivalence test run in the workers (module-level, picklable).
        start_timeout_s: time limit of one worker's start-up (spawn, imports, warm-up).
        mp_context: multiprocessing start method for the workers (see :mod:`dsrl_fast.reward.pool`).

    Identical ``(answer, reference)`` pairs in a batch are checked once. ``last_stats`` holds the
    :class:`~dsrl_fast.reward.base.RewardStats` of the last call, ``last_check_seconds`` the time of each check
    its workers ran (from dispatch to result or kill). Use as a context manager or call
    :meth:`close` to stop the workers early.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int | None = None,
        fast_path: bool = True,
        check: Callable[[str, str], bool] = math_verify_check,
        start_timeout_s: float = 120.0,
        mp_context: StartMethod = DEFAULT_START_METHOD,
    ):
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        if not isinstance(fast_path, bool):
            raise TypeError(f"fast_path must be a bool, got {type(fast_path).__name__}")
        self.fast_path = fast_path
        self.pool = CheckPool(check, workers, timeout_s, start_timeout_s=start_timeout_s, mp_context=mp_context,
                              preload=("math_verify",), warm_up=_WARM_UP)
        self.last_stats = RewardStats()
        self.last_check_seconds: list[float] = []

    def _decide_here(self, answer: str, reference: str) -> Outcome | None:
        if not self.fast_path:
            return None
        if answers_match_fast(answer, reference):
            return Outcome.CORRECT
        if canonical_decimal(normalize_answer(answer)) is not None and \
                canonical_decimal(normalize_answer(reference)) is not None:
            return Outcome.WRONG
        return None

    def outcomes(self, responses: list[str], references: list[str]) -> list[Outcome]:
        """The :class:`~dsrl_fast.reward.base.Outcome` of each response."""
        check_batch(responses, references)
        out: list[Outcome] = [Outcome.NO_ANSWER] * len(responses)
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
            answer = extract_boxed(response)
            if answer is None:
                continue
            answer, reference = normalize_unicode(answer), normalize_unicode(reference)
            decided = self._decide_here(answer, reference)
            if decided is None:
                pending.setdefault((answer, reference), []).append(i)
            else:
                out[i] = decided
        self.last_check_seconds = []
        if pending:
            for outcome, indices in zip(self.pool.run(list(pending)), pending.values(), strict=True):
                for i in indices:
                    out[i] = outcome
            self.last_check_seconds = self.pool.last_check_seconds
        return out

    def __call__(self, responses: list[str], references: list[str]) -> list[float]:
        outcomes = self.outcomes(responses, references)
        self.last_stats = RewardStats.from_outcomes(outcomes)
        return [float(o == Outcome.CORRECT) for o in outcomes]

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
