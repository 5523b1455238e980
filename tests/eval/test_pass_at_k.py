"""Unbiased pass@k against brute-force enumeration of subsets; avg@k; maj@k."""

from __future__ import annotations

import itertools
import math

import pytest

from dsrl_fast.eval.pass_at_k import avg_at_k, majority_at_k, mean_pass_at_k, pass_at_k, pass_at_k_curve


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


def test_curve_matches_enumeration_and_drops_large_k():
    counts, totals = [0, 3, 7, 2], [7, 7, 7, 5]
    curve = pass_at_k_curve(counts, totals, [4, 1, 2, 8, 5, 2])
    assert list(curve) == [1, 2, 4, 5]  # sorted, deduplicated; k=8 > min(n)=5 is left out
    for k, value in curve.items():
        expected = sum(brute_force_pass_at_k(t, c, k) for t, c in zip(totals, counts)) / len(counts)
        assert value == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="ks must hold ints >= 1"):
        pass_at_k_curve([1], 4, [0])
    with pytest.raises(ValueError, match="num_correct must not be empty"):
        pass_at_k_curve([], 4, [1])


def test_curve_is_monotone_at_paper_scale():
    rng = __import__("numpy").random.default_rng(1)
    counts = rng.integers(0, 301, size=50).tolist()
    curve = pass_at_k_curve(counts, 300, [2**i for i in range(9)])
    values = list(curve.values())
    assert list(curve) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert values[0] == pytest.approx(sum(counts) / (300 * 50))  # pass@1 is the mean accuracy
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values))


def test_majority_on_hand_examples():
    answers = ["7", "7", "3", None, "3", "3", "5", None]
    scores = [1, 1, 0, 0, 0, 0, 0, 0]
    assert majority_at_k(answers, scores, 1) == pytest.approx(2 / 8)
    # blocks of 2: (7,7) right, (3,None) wrong, (3,3) wrong, (5,None) wrong
    assert majority_at_k(answers, scores, 2) == pytest.approx(1 / 4)
    # blocks of 3: (7,7,3) -> 7 right; (None,3,3) -> 3 wrong; the last 2 samples form no block
    assert majority_at_k(answers, scores, 3) == pytest.approx(1 / 2)
    # one block of 8: 3 appears 3 times, 7 twice
    assert majority_at_k(answers, scores, 8) == 0.0
    # ties go to the answer seen first in the block
    assert majority_at_k(["1", "2", "2", "1"], [1, 0, 0, 1], 4) == 1.0
    assert majority_at_k([None, None], [0, 0], 2) == 0.0


def test_majority_blocks_are_unbiased_over_orderings():
    """Averaged over every ordering of the samples, the block estimate equals maj@k over all k-subsets
    (two answers and odd k: no ties)."""
    answers = ["a", "a", "b", "b", "b", "a", "b"]
    scores = [1.0 if a == "a" else 0.0 for a in answers]
    k = 3
    subsets = list(itertools.combinations(range(len(answers)), k))
    exact = sum(float(sum(answers[i] == "a" for i in s) * 2 > k) for s in subsets) / len(subsets)
    orders = list(itertools.permutations(range(len(answers))))
    mean = sum(majority_at_k([answers[i] for i in o], [scores[i] for i in o], k) for o in orders) / len(orders)
    assert mean == pytest.approx(exact, abs=1e-12)


def test_majority_validation():
    with pytest.raises(ValueError, match="same length"):
        majority_at_k(["1"], [1, 0], 1)
    with pytest.raises(ValueError, match="k must be in"):
        majority_at_k(["1", "2"], [1, 0], 3)
    with pytest.raises(TypeError, match="k must be an int"):
        majority_at_k(["1", "2"], [1, 0], 1.0)
