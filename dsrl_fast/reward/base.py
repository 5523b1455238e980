"""What every reward shares: the call signature, per-check outcomes and the counts a batch reports."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MalformedAnswer", "Outcome", "RewardFn", "RewardStats", "check_batch", "reward_stats"]


class RewardFn(Protocol):
    """``(responses, references) -> scores``: one float per response, same order."""

    def __call__(self, responses: list[str], references: list[str]) -> list[float]: ...


class MalformedAnswer(ValueError):
    """Raised by a check when the *answer* cannot be read (its check scores 0.0 and counts as ``no_answer``)."""


class Outcome(enum.IntEnum):
    """How one response was scored. Only CORRECT scores 1.0."""

    WRONG = 0
    CORRECT = 1
    NO_ANSWER = 2  # no complete final box, an empty or over-long one, or an answer the checker cannot read
    TIMEOUT = 3  # the check ran past its time limit and its worker was killed
    ERROR = 4  # the check raised, its worker crashed twice, or the reference cannot be read


@dataclass(frozen=True)
class RewardStats:
    """Outcome counts of one reward call (every field counts responses, duplicates included).

    ``no_answer``, ``reward_timeouts`` and ``reward_errors`` are the responses that scored 0.0 for a reason other
    than a wrong answer; they are the step metrics of the same names.
    """

    responses: int = 0
    correct: int = 0
    no_answer: int = 0
    reward_timeouts: int = 0
    reward_errors: int = 0

    @classmethod
    def from_outcomes(cls, outcomes: Sequence[Outcome]) -> RewardStats:
        """Counts of a list of per-response outcomes."""
        return cls(
            responses=len(outcomes),
            correct=sum(o == Outcome.CORRECT for o in outcomes),
            no_answer=sum(o == Outcome.NO_ANSWER for o in outcomes),
            reward_timeouts=sum(o == Outcome.TIMEOUT for o in outcomes),
            reward_errors=sum(o == Outcome.ERROR for o in outcomes),
        )

    def metrics(self) -> dict[str, int]:
        """The three step metrics: ``reward_timeouts``, ``reward_errors``, ``no_answer``."""
        return {"reward_timeouts": self.reward_timeouts, "reward_errors": self.reward_errors,
                "no_answer": self.no_answer}


def reward_stats(reward_fn: object) -> RewardStats | None:
    """The :class:`RewardStats` of ``reward_fn``'s last call, or None when it does not count outcomes.

    Looks for a ``last_stats`` attribute on the callable, or on the instance a bound method belongs to
    (``MathVerifyReward(...).__call__``).
    """
    stats = getattr(reward_fn, "last_stats", None)
    if stats is None:
        stats = getattr(getattr(reward_fn, "__self__", None), "last_stats", None)
    return stats if isinstance(stats, RewardStats) else None


def check_batch(responses: object, references: object) -> None:
    """TypeError/ValueError unless both are lists (or tuples) of str of one length."""
    for name, value in (("responses", responses), ("references", references)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            bad = type(value).__name__ if not isinstance(value, (list, tuple)) else \
                next(type(x).__name__ for x in value if not isinstance(x, str))
            raise TypeError(f"{name} must be a list of str, got {bad}")
    assert isinstance(responses, (list, tuple)) and isinstance(references, (list, tuple))
    if len(responses) != len(references):
        raise ValueError(
            f"responses and references must have the same length, got {len(responses)} and {len(references)}"
        )
