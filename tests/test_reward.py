"""Answer extraction, normalization, math-verify rewards, the time-limited check pool."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dsrl_fast.reward import (
    CheckPool,
    MathVerifyReward,
    answers_match_fast,
    exact_match_reward,
    extract_boxed,
    get_reward_fn,
    normalize_answer,
    register_reward_fn,
)


def sleepy_check(answer: str, reference: str) -> bool:
    """A check that hangs on "hang" and kills its process on "crash"."""
    if answer == "hang":
        time.sleep(600)
    if answer == "crash":
        os._exit(3)
    return answer == reference


def broken_check(answer: str, reference: str) -> bool:
    raise ImportError("no checker backend")


def never_check(answer: str, reference: str) -> bool:
    return False


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(timeout_s=10.0, num_workers=2) as fn:
        yield fn


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{x^{2^{3}}} end", "x^{2^{3}}"),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed {7}", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{1} and then \\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text", ["no box here", "", "\\boxed{12", "\\boxed{}", "\\boxed{ }", "\\boxedx{3}", "\\boxed{\\}"]
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


def test_extract_boxed_type():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_boxed(None)


def test_fast_match():
    assert normalize_answer(" $\\dfrac{1}{2}$. ") == "\\frac{1}{2}"
    assert normalize_answer("\\left( 1,\\, 2 \\right)") == "(1,2)"
    assert normalize_answer("\\rightarrow") == "\\rightarrow"
    assert answers_match_fast("27", "27.0")
    assert answers_match_fast("-0.50", "-.5")
    assert answers_match_fast("\\tfrac{1}{2}", "\\frac{1}{2}")
    assert not answers_match_fast("2", "3")
    assert not answers_match_fast("1,2", "12")
    assert not answers_match_fast("", "")
    assert not answers_match_fast("0.5", "\\frac{1}{2}")


def test_exact_match():
    fn = get_reward_fn("exact_match")
    assert fn is exact_match_reward
    scores = fn(["\\boxed{27}", "\\boxed{0.5}", "none", "\\boxed{4"], ["27.0", "\\frac{1}{2}", "1", "4"])
    assert scores == [1.0, 0.0, 0.0, 0.0]


EQUIVALENT = [
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac12}", "0.5"),
    ("\\boxed{1/2}", "\\dfrac{1}{2}"),
    ("\\boxed{27}", "27.0"),
    ("\\boxed{27.0}", "27"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{(1, 2)}", "(1,2)"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{$\\frac{1}{2n+2}$}", "$\\frac{1}{2 n+2}$"),
]
WRONG = [
    ("\\boxed{0.51}", "\\frac{1}{2}"),
    ("\\boxed{28}", "27.0"),
    ("\\boxed{(2, 1)}", "(1,2)"),
    ("\\boxed{x^2+1}", "(x+1)^2"),
    ("The answer is 27.", "27"),
    ("\\boxed{27", "27"),
    ("\\boxed{\\frac{}{", "1"),
    ("\\boxed{\\left(}", "1"),
    ("\\boxed{}}}{{", "1"),
    ("\\boxed{\\sqrt{}}", "2"),
]


def test_math_verify_equivalences(reward):
    responses, references = zip(*(EQUIVALENT + WRONG), strict=True)
    scores = reward(list(responses), list(references))
    assert scores == [1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)


def test_math_verify_without_fast_path():
    with MathVerifyReward(timeout_s=10.0, num_workers=1, fast_path=False) as fn:
        assert fn(["\\boxed{27}", "\\boxed{3}", "\\boxed{\\frac{1}{3}}"], ["27", "4", "\\frac{1}{3}"]) == [
            1.0,
            0.0,
            1.0,
        ]


def test_fast_path_skips_workers():
    fn = MathVerifyReward(num_workers=1, check=never_check)
    assert fn(["\\boxed{27.0}", "\\boxed{\\dfrac{1}{2}}", "nothing"], ["27", "\\frac{1}{2}", "1"]) == [1.0, 1.0, 0.0]
    assert fn.pool.processes == []
    fn.close()


def test_reward_from_a_thread(reward):
    responses, references = zip(*EQUIVALENT[:4], *WRONG[:2], strict=True)
    out = []
    thread = threading.Thread(target=lambda: out.append(reward(list(responses), list(references))))
    thread.start()
    thread.join(60)
    assert out == [[1.0] * 4 + [0.0] * 2]


def test_reward_validates_input(reward):
    with pytest.raises(ValueError, match="same length"):
        reward(["\\boxed{1}"], [])
    with pytest.raises(TypeError, match="responses must be a list of str"):
        reward([None], ["1"])
    with pytest.raises(TypeError, match="references must be a list of str"):
        reward(["\\boxed{1}"], [1])
    assert reward([], []) == []


def test_registry():
    with pytest.raises(ValueError, match="name must be one of"):
        get_reward_fn("nope")
    register_reward_fn("always_one", lambda: lambda responses, references: [1.0] * len(responses))
    assert get_reward_fn("always_one")(["a", "b"], ["c", "d"]) == [1.0, 1.0]
    with pytest.raises(TypeError, match="factory must be callable"):
        register_reward_fn("bad", 3)


def test_timeout_and_crash_score_zero_and_do_not_leak():
    pool = CheckPool(sleepy_check, num_workers=1, timeout_s=1.0)
    assert pool.run([("a", "a")]) == [True]  # warm: the worker is up
    first = pool.processes[0]
    start = time.monotonic()
    out = []
    thread = threading.Thread(
        target=lambda: out.append(pool.run([("hang", "x"), ("b", "b"), ("crash", "c"), ("d", "e")]))
    )
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert out == [[False, True, False, False]]
    assert time.monotonic() - start < 60
    assert not first.is_alive() and first.exitcode is not None  # killed and reaped
    live = pool.processes
    assert len(live) == 1 and live[0] is not first
    pool.close()
    assert not any(p.is_alive() for p in live)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([("a", "a")])


def test_check_pool_start_failure():
    pool = CheckPool(broken_check, num_workers=1, timeout_s=1.0)
    with pytest.raises(RuntimeError, match="failed to start: ImportError: no checker backend"):
        pool.run([("a", "a")])
    assert pool.processes == []
    pool.close()


def test_check_pool_validation():
    with pytest.raises(ValueError, match="num_workers must be an int >= 1"):
        CheckPool(sleepy_check, num_workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        CheckPool(sleepy_check, num_workers=1, timeout_s=0)
