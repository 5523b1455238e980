"""Unbiased pass@k against brute-force enumeration; avg@k."""

from __future__ import annotations

import itertools
import math

import pytest

from dsrl_fast.pass_at_k import avg_at_k, mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_edge_values_and_large_n():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(300, 1, 1) == pytest.approx(1 / 300)
    # 1 - C(290, 256) / C(300, 256): exact big-integer reference where the binomials overflow floats
    exact = 1 - math.comb(290, 256) / math.comb(300, 256)
    assert pass_at_k(300, 10, 256) == pytest.approx(exact, rel=1e-12)


def test_mean_pass_at_k():
    assert mean_pass_at_k([0, 4, 2], 4, 1) == pytest.approx((0 + 1 + 0.5) / 3)
    assert mean_pass_at_k([1, 1], [2, 4], 2) == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="n must be an int or have len"):
        mean_pass_at_k([1, 1], [2], 1)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 1, 1], [0, 0, 0, 0]]) == pytest.approx(0.375)
    assert avg_at_k([[True, False], [1.0, 1.0, 1.0]]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one"):
        avg_at_k([[1], []])


def test_validation():
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(5, 1, 0)
    with pytest.raises(ValueError, match="c must be in"):
        pass_at_k(5, 6, 1)
    with pytest.raises(TypeError, match="n must be an int"):
        pass_at_k(5.0, 1, 1)
