"""Scores of sampled responses and the per-benchmark summary: Avg@n, Pass@k, maj@k, length, thought taxonomy.

A response counts as correct for Pass@k when its reward is 1.0 (full credit). maj@k votes on the normalized final
boxed answers (:func:`dsrl_fast.reward.normalize_answer`); responses without one do not vote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsrl_fast.eval.thoughts import ThoughtCounts, count_thoughts
from dsrl_fast.data.problems import Problem
from dsrl_fast.eval.cache import ProblemSamples
from dsrl_fast.eval.pass_at_k import avg_at_k, majority_at_k, pass_at_k_curve
from dsrl_fast.reward import RewardFn, extract_boxed, normalize_answer

__all__ = ["BenchmarkResult", "ProblemScores", "RowSettings", "score_samples", "summarize"]

_REWARD_CHUNK = 4096


@dataclass(frozen=True)
class ProblemScores:
    """Rewards and normalized final answers (None: no boxed answer) of one problem's responses."""

    index: int
    reference: str
    scores: list[float]
    answers: list[str | None]

    @property
    def num_correct(self) -> int:
        """Responses with full credit."""
        return sum(s >= 1.0 for s in self.scores)


@dataclass(frozen=True)
class RowSettings:
    """What decides a result besides the model and the problems, printed with it so that two tables can be compared:
    the scorer (reward spec), the length cap actually used, the sampling temperature and top_p."""

    scorer: str
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class BenchmarkResult:
    """One model on one benchmark.

    Attributes:
        avg: Avg@n, the mean reward over all n samples of every problem.
        pass_at_k / maj_at_k: {k: value} for each asked k <= n.
        mean_tokens: mean response length in tokens; truncated: share of responses cut by the length cap.
        thoughts: the thought taxonomy's step counts pooled over all responses.
        settings: the scorer, length cap, temperature and top_p the numbers were made with.
    """

    model: str
    benchmark: str
    problems: int
    n: int
    avg: float
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    mean_tokens: float
    truncated: float
    thoughts: ThoughtCounts
    settings: RowSettings


def score_samples(samples: Sequence[ProblemSamples], problems: Sequence[Problem],
                  reward_fn: RewardFn) -> list[ProblemScores]:
    """Rewards of every response (reward_fn called on chunks of up to 4096 responses) and their final answers."""
    if len(samples) != len(problems):
        raise ValueError(f"samples and problems must have the same length, got {len(samples)} and {len(problems)}")
    flat = [(i, text) for i, s in enumerate(samples) for text in s.responses]
    scores: list[float] = []
    for start in range(0, len(flat), _REWARD_CHUNK):
        chunk = flat[start:start + _REWARD_CHUNK]
        scores.extend(reward_fn([t for _, t in chunk], [problems[samples[i].index].answer for i, _ in chunk]))
    out, pos = [], 0
    for s in samples:
        k = len(s.responses)
        answers = [extract_boxed(t) for t in s.responses]
        keys = [normalize_answer(a) if a is not None else None for a in answers]
        out.append(ProblemScores(s.index, problems[s.index].answer, [float(x) for x in scores[pos:pos + k]], keys))
        pos += k
    return out


def summarize(model: str, benchmark: str, samples: Sequence[ProblemSamples], scores: Sequence[ProblemScores],
              ks: Sequence[int], settings: RowSettings) -> BenchmarkResult:
    """Avg@n, Pass@k and maj@k (each k in `ks` up to n), lengths and thought counts of one model on one benchmark,
    made with `settings`."""
    if not scores or len(samples) != len(scores):
        raise ValueError(f"samples and scores must be non-empty and of one length, got {len(samples)} and "
                         f"{len(scores)}")
    n = min(len(s.scores) for s in scores)
    curve = pass_at_k_curve([s.num_correct for s in scores], [len(s.scores) for s in scores], ks)
    maj = {k: sum(majority_at_k(s.answers, s.scores, k) for s in scores) / len(scores) for k in curve}
    tokens = [t for s in samples for t in s.num_tokens]
    finished = [f for s in samples for f in s.finished]
    return BenchmarkResult(
        model=model, benchmark=benchmark, problems=len(scores), n=n, avg=avg_at_k([s.scores for s in scores]),
        pass_at_k=curve, maj_at_k=maj, mean_tokens=sum(tokens) / max(len(tokens), 1),
        truncated=1.0 - sum(finished) / max(len(finished), 1),
        thoughts=count_thoughts(text for s in samples for text in s.responses), settings=settings,
    )
