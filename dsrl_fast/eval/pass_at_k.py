"""Unbiased pass@k, avg@k and maj@k over sampled answers.

pass@k of one problem with ``n`` samples of which ``c`` are correct is the chance that ``k``
samples drawn without replacement contain a correct one: ``1 - C(n-c, k) / C(n, k)``
(Chen et al. 2021), computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms
the huge binomials (``C(300, 256)`` overflows a float64). avg@k is the mean correctness of the
samples. maj@k is the correctness of the most frequent answer among ``k`` samples, estimated from
``n`` samples as the mean over the ``n // k`` disjoint consecutive blocks of ``k`` samples.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["avg_at_k", "majority_at_k", "mean_pass_at_k", "pass_at_k", "pass_at_k_curve"]


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``n`` samples, ``c`` correct, ``1 <= k <= n``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        _check_int(name, value)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _totals(counts: list[int], n: int | Sequence[int]) -> list[int]:
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        return [int(n)] * len(counts)
    totals = list(n)  # type: ignore[arg-type]
    if len(totals) != len(counts):
        raise ValueError(f"n must be an int or have len(num_correct)={len(counts)} entries, got {len(totals)}")
    return totals


def mean_pass_at_k(num_correct: Sequence[int], n: int | Sequence[int], k: int) -> float:
    """pass@k averaged over problems; ``n`` is one sample count for all or one per problem."""
    counts = list(num_correct)
    if not counts:
        raise ValueError("num_correct must not be empty")
    totals = _totals(counts, n)
    return float(np.mean([pass_at_k(t, c, k) for t, c in zip(totals, counts, strict=True)]))


def pass_at_k_curve(num_correct: Sequence[int], n: int | Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """{k: mean pass@k} for every ``k`` in ``ks`` that is at most the smallest per-problem sample count.

    num_correct: correct samples per problem; n: samples per problem (one int or one per problem);
    ks: the k values asked for (each >= 1). Larger k are left out: pass@k needs ``n >= k`` samples.
    """
    counts = list(num_correct)
    if not counts:
        raise ValueError("num_correct must not be empty")
    totals = _totals(counts, n)
    for k in ks:
        _check_int("ks[i]", k)
        if k < 1:
            raise ValueError(f"ks must hold ints >= 1, got {k}")
    smallest = min(totals)
    return {int(k): mean_pass_at_k(counts, totals, int(k)) for k in sorted(set(ks)) if k <= smallest}


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """avg@k: per problem the mean score of its samples (1/0 or fractional), averaged over problems."""
    rows = [list(row) for row in scores]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("scores must hold at least one problem and every problem at least one sample")
    return float(np.mean([np.mean(np.asarray(row, dtype=np.float64)) for row in rows]))


def majority_at_k(answers: Sequence[Hashable | None], scores: Sequence[float], k: int) -> float:
    """maj@k of one problem from its ``n`` samples, ``1 <= k <= n``.

    answers: each sample's answer key (e.g. its normalized boxed answer), None when it gave none;
    scores: each sample's score. Each of the ``n // k`` disjoint consecutive blocks of ``k`` samples
    votes: its most frequent answer (ties: the one that appears first in the block) scores like the
    first sample that gave it; a block without any answer scores 0. Returns the mean over blocks.
    """
    _check_int("k", k)
    if len(answers) != len(scores):
        raise ValueError(f"answers and scores must have the same length, got {len(answers)} and {len(scores)}")
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    results = []
    for start in range(0, n - k + 1, k):
        votes: dict[Hashable, list[int]] = {}
        for i in range(start, start + k):
            if answers[i] is not None:
                votes.setdefault(answers[i], []).append(i)
        if not votes:
            results.append(0.0)
            continue
        # dicts keep insertion order, so max() returns the earliest answer among equally frequent ones
        winner = max(votes.values(), key=len)
        results.append(float(scores[winner[0]]))
    return float(np.mean(results))
