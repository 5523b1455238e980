"""Unbiased pass@k and avg@k over sampled answers.

pass@k of one problem with ``n`` samples of which ``c`` are correct is the chance that ``k``
samples drawn without replacement contain a correct one: ``1 - C(n-c, k) / C(n, k)``
(Chen et al. 2021), computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms
the huge binomials. avg@k is the mean correctness of the samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["avg_at_k", "mean_pass_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``n`` samples, ``c`` correct, ``1 <= k <= n``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(num_correct: Sequence[int], n: int | Sequence[int], k: int) -> float:
    """pass@k averaged over problems; ``n`` is one sample count for all or one per problem."""
    counts = list(num_correct)
    if not counts:
        raise ValueError("num_correct must not be empty")
    totals = [n] * len(counts) if isinstance(n, (int, np.integer)) else list(n)
    if len(totals) != len(counts):
        raise ValueError(f"n must be an int or have len(num_correct)={len(counts)} entries, got {len(totals)}")
    return float(np.mean([pass_at_k(t, c, k) for t, c in zip(totals, counts, strict=True)]))


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """avg@k: per problem the mean score of its samples (1/0 or fractional), averaged over problems."""
    rows = [list(row) for row in scores]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("scores must hold at least one problem and every problem at least one sample")
    return float(np.mean([np.mean(np.asarray(row, dtype=np.float64)) for row in rows]))
