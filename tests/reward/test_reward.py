"""Answer extraction, normalization, the Hendrycks check, math-verify rewards, the check pool and the corpus.

Timing tests run under CPU load: one busy-looping process per core (at most 2) for the test's duration.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsrl_fast.reward import (
    MAX_ANSWER_CHARS,
    CheckPool,
    HendrycksMathReward,
    MathVerifyReward,
    Outcome,
    RewardStats,
    answers_match_fast,
    canonical_decimal,
    check_reward_spec,
    exact_match_reward,
    extract_boxed,
    get_reward_fn,
    hendrycks_equiv,
    hendrycks_normalize,
    normalize_answer,
    normalize_unicode,
    register_reward_fn,
    reward_stats,
)
from dsrl_fast.reward.pool import DEFAULT_START_METHOD
from tests import reward_checks as rc

TIMEOUT_S = 3.0  # the corpus checks' limit
KILL_SLACK_S = 0.5  # a check past its limit must be stopped within this, under load
CALLER_BOUND_S = 0.5  # work done in the calling thread for one response (extraction, fast path), under load


@pytest.fixture
def cpu_load() -> Iterator[None]:
    ctx = mp.get_context("spawn")
    burners = [ctx.Process(target=rc.burn, daemon=True) for _ in range(min(2, os.cpu_count() or 1))]
    for p in burners:
        p.start()
    yield
    for p in burners:
        p.kill()
        p.join()


@pytest.fixture(scope="module", autouse=True)
def fork_server() -> None:
    """Start the workers' fork server once (it imports torch and math-verify: seconds); pools then fork workers
    in milliseconds, so the start-up time limits below can be short."""
    pool = CheckPool(rc.sleepy_check, num_workers=1, timeout_s=5.0, preload=("math_verify",))
    pool.warm_up()
    pool.close()




# --- extraction -------------------------------------------------------------------------------------------------


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
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{1} and then \\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
        ("\\boxed{4} \\boxedx{5}", "4"),
        ("\\fbox{4} \\boxed{5}", "5"),
        ("\\boxed{5} \\fbox{4}", "5"),
        ("\\boxed{a\\\\b}", "a\\\\b"),
        ("\\boxed{12}}", "12"),
        ("\\boxed 5 is wrong, so \\boxed{6}", "6"),
        ("\\boxed 12\nmore text", "12"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    ["no box here", "", "\\boxed{12", "\\boxed{}", "\\boxed{ }", "\\boxedx{3}", "\\boxed{\\}", "\\boxed",
     "\\boxed12}", "\\boxed12", "\\boxed\\frac12", "\\boxed{1{2}", "\\boxed{12} then \\boxed13}",
     "\\boxed{12} \\boxed{13", "\\fbox{12}", "\\boxed\n12"],
)
def test_extract_boxed_none(text):
    """No complete last box: unclosed, unbalanced (``\\boxed12}`` read as ``12}`` before), brace-less without a space,
    empty, or ``\\fbox`` (read before; the authors' rule scores it 0)."""
    assert extract_boxed(text) is None


# The authors' reward (verl's math_reward: Hendrycks last_boxed_only_string + remove_boxed + is_equiv) and ours agree
# on these; the first ones are the forms where the extraction decides the score.
AUTHORS_CASES = [
    ("\\boxed12}", "12"), ("\\boxed12", "12"), ("\\boxed{12", "12"), ("\\boxed{1{2}", "12"), ("\\fbox{12}", "12"),
    ("\\boxed{12} so \\boxed13}", "12"), ("\\boxed{12} so \\boxed{13", "12"), ("\\boxed{12}", "12"),
    ("\\boxed{\\frac{1}{2}}", "\\frac12"), ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("so $\\boxed 5$.", "5"), ("\\boxed 12", "12"), ("\\boxed{3} then \\boxed{4}", "4"),
    ("\\boxed{3} then \\boxed{4}", "3"), ("\\boxed{\\boxed{3}}", "3"), ("\\fbox{4} \\boxed{5}", "5"), ("\\boxed{5} \\fbox{4}", "5"),
    ("\\boxed{5} \\fbox{4}", "4"), ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"), ("\\boxed{12}}", "12"), ("\\boxed{}", "1"),
    ("no box", "12"),
]


@pytest.mark.parametrize("reward", ["hendrycks_math", "math_verify", "exact_match"])
def test_every_reward_needs_a_complete_last_box(reward):
    """``\\boxed12}`` scored 1 against 12 under math_verify (extracted as ``12}``); every reward now scores the
    incomplete last box 0 as no answer, and an ``\\fbox`` too."""
    responses = ["\\boxed12}", "\\boxed12", "\\boxed{12} \\boxed13}", "\\fbox{12}", "\\boxed{12}", "\\boxed 12"]
    fn = get_reward_fn(reward, **({"num_workers": 1} if reward == "math_verify" else {}))
    try:
        assert fn(responses, ["12"] * len(responses)) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
        stats = reward_stats(fn)
        assert stats is None or stats.no_answer == 4
    finally:
        getattr(fn, "close", lambda: None)()


def test_boxed_rule_is_the_authors():
    """HendrycksMathReward(unicode=False) gives the authors' own reward function's score on every case, read from
    the peer itself (verl 0.9.1's math_reward, which the authors' verl 0.5 fork ships unchanged)."""
    math_reward = pytest.importorskip("verl.utils.reward_score.math_reward", reason="the authors' reward ships in verl")
    ours = HendrycksMathReward(unicode=False)
    responses, references = [r for r, _ in AUTHORS_CASES], [g for _, g in AUTHORS_CASES]
    theirs = [math_reward.compute_score(r, g) for r, g in AUTHORS_CASES]
    assert ours(responses, references) == theirs
    assert sum(theirs) >= 8 and theirs.count(0.0) >= 8  # both outcomes are exercised


def test_extract_boxed_length_cap():
    """A box whose content is longer than max_chars is no answer; at the cap it is read."""
    assert extract_boxed("\\boxed{" + "1" * 10 + "}", max_chars=10) == "1" * 10
    assert extract_boxed("\\boxed{" + "1" * 11 + "}", max_chars=10) is None
    assert extract_boxed("\\boxed " + "1" * 10, max_chars=10) == "1" * 10
    assert extract_boxed("\\boxed " + "1" * 11, max_chars=10) is None
    assert extract_boxed("\\boxed " + "1" * 10 + "$" + "2" * 20, max_chars=10) == "1" * 10
    assert extract_boxed("\\boxed{" + "7" * MAX_ANSWER_CHARS + "}") == "7" * MAX_ANSWER_CHARS
    assert extract_boxed("\\boxed{" + "7" * (MAX_ANSWER_CHARS + 1) + "}") is None


@pytest.mark.parametrize(
    "text",
    ["x " * 2_500_000 + "\\boxed{42}", "\\boxed{" + "{" * 5_000_000, "\\boxed{1}" * 550_000,
     "\\boxed{" + "\\" * 5_000_000 + "}", "\\boxed " + "9" * 5_000_000],
)
def test_extract_boxed_is_fast_on_5_mb(text):
    """It took 0.73 s before the last box was found with rfind and the scan capped (now ~0.01-0.03 s)."""
    start = time.perf_counter()
    extract_boxed(text)
    assert time.perf_counter() - start < 0.2


def test_extract_boxed_validation():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_boxed(None)
    with pytest.raises(ValueError, match="max_chars must be an int >= 1"):
        extract_boxed("x", max_chars=0)


# --- normalization and the exact fast path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("½", "\\frac{1}{2}"),
        ("1¾", "1\\frac{3}{4}"),
        ("√2", "\\sqrt{2}"),
        ("√(x+1)", "\\sqrt{x+1}"),
        ("√x", "\\sqrt{x}"),
        ("√\\pi", "\\sqrt{\\pi}"),
        ("∛8", "\\sqrt[3]{8}"),
        ("−3", "-3"),
        ("2×3", "2\\times 3"),
        ("x²³", "x^{23}"),
        ("x₁", "x_{1}"),
        ("３π", "3\\pi "),
        ("2\u200b7", "27"),
        ("30°", "30^\\circ "),
        ("plain ascii \\frac{1}{2}", "plain ascii \\frac{1}{2}"),
    ],
)
def test_normalize_unicode(text, expected):
    assert normalize_unicode(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("27", "27"), ("27.0", "27"), ("-007.50", "-7.5"), ("-0.0", "0"), ("+0", "0"), (".5", "0.5"), ("5.", "5"),
     ("-.25", "-0.25"), ("0." + "0" * 400 + "1", "0." + "0" * 400 + "1"), ("1e5", None), ("1,000", None),
     ("\\frac12", None), ("", None), (".", None), ("-", None), ("٣", None)],
)
def test_canonical_decimal(text, expected):
    assert canonical_decimal(text) == expected


def test_fast_match():
    assert normalize_answer(" $\\dfrac{1}{2}$. ") == "\\frac{1}{2}"
    assert normalize_answer("\\left( 1,\\, 2 \\right)") == "(1,2)"
    assert normalize_answer("\\rightarrow") == "\\rightarrow"
    assert normalize_answer("50\\%") == "50"
    assert answers_match_fast("27", "27.0")
    assert answers_match_fast("-0.50", "-.5")
    assert answers_match_fast("\\tfrac{1}{2}", "\\frac{1}{2}")
    assert answers_match_fast("½", "\\frac{1}{2}")
    assert answers_match_fast("−3", "-3")
    assert not answers_match_fast("2", "3")
    assert not answers_match_fast("1,2", "12")
    assert not answers_match_fast("", "")
    assert not answers_match_fast("0.5", "\\frac{1}{2}")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("9007199254740993", "9007199254740992"),
        ("12345678901234567890", "12345678901234567891"),
        ("1" + "0" * 30, "1" + "0" * 29 + "1"),
        ("1" + "0" * 400, "2" + "0" * 400),
        ("0." + "0" * 400 + "1", "0"),
        ("1" * 999_999 + "2", "1" * 999_999 + "3"),
    ],
)
def test_fast_match_is_exact(a, b):
    """The fast path's former float comparisons: every pair scored 1.0."""
    assert not answers_match_fast(a, b)
    assert answers_match_fast(a, a + ("000" if "." in a else ".000"))


def test_exact_match():
    fn = get_reward_fn("exact_match")
    assert fn is exact_match_reward
    scores = fn(["\\boxed{27}", "\\boxed{0.5}", "none", "\\boxed{4"], ["27.0", "\\frac{1}{2}", "1", "4"])
    assert scores == [1.0, 0.0, 0.0, 0.0]


# --- the Hendrycks MATH check -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("90^{\\circ}", "90"),
        ("90^\\circ", "90"),
        ("\\$5", "5"),
        ("5 \\text{ cm}", "5"),
        ("50\\%", "50"),
        (".25", "0.25"),
        (".5", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("0.50", "0.50"),
        ("x = 3", "3"),
        ("abc = 3", "abc=3"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("3/4", "\\frac{3}{4}"),
        ("x/4", "x/4"),
        ("a\\!b\n", "ab"),
        ("27.0", "27.0"),
        ("\\frac1", "\\frac1"),
        ("", ""),
    ],
)
def test_hendrycks_normalize(raw, normalized):
    assert hendrycks_normalize(raw) == normalized


def test_hendrycks_equiv_falls_back_to_raw_strings():
    """Where the published rules raise (two "\\text{ ", a trailing \\sqrt or \\frac), raw strings are compared."""
    assert hendrycks_equiv("1\\text{ a}\\text{ b}", "1\\text{ a}\\text{ b}")
    assert not hendrycks_equiv("1\\text{ a}\\text{ b}", "1")
    assert hendrycks_equiv("2\\sqrt", "2\\sqrt") and not hendrycks_equiv("2\\sqrt", "2\\sqrt ")
    assert hendrycks_equiv("\\frac", "\\frac")


def test_hendrycks_reward_and_stats():
    fn = get_reward_fn("hendrycks_math")
    assert isinstance(fn, HendrycksMathReward)
    responses = ["\\boxed{\\dfrac12}", "\\boxed{27.0}", "\\boxed{5 \\text{ cm}}", "none", "\\boxed{½}", "\\boxed{2"]
    references = ["\\frac{1}{2}", "27", "5", "1", "\\frac{1}{2}", "2"]
    assert fn(responses, references) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert fn.last_stats == RewardStats(responses=6, correct=3, no_answer=2)
    assert HendrycksMathReward(unicode=False)(["\\boxed{½}"], ["\\frac{1}{2}"]) == [0.0]
    with pytest.raises(TypeError, match="unicode must be a bool"):
        HendrycksMathReward(unicode=1)


# --- the corpus -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    from tests.reward_corpus import CASES

    return CASES


def test_corpus_is_as_described(corpus):
    kinds = {k: sum(c.kind == k for c in corpus) for k in ("equivalent", "must_fail", "adversarial", "random")}
    assert sum(kinds.values()) == len(corpus) and min(kinds.values()) >= 20, kinds
    assert len({c.name for c in corpus}) == len(corpus)
    assert sum(c.outcome == Outcome.TIMEOUT for c in corpus) >= 3


def test_corpus_hendrycks(corpus):
    fn = HendrycksMathReward()
    got = fn([c.response for c in corpus], [c.reference for c in corpus])
    wrong = [(c.name, s) for c, s in zip(corpus, got, strict=True) if s != c.hendrycks]
    assert not wrong


def test_corpus_math_verify_under_load(corpus, cpu_load):
    """Every case scores as expected, one call per case, with the CPUs busy; each check sent to a worker ends
    within its limit plus KILL_SLACK_S and the caller's own work stays under CALLER_BOUND_S."""
    false_pos, false_neg, wrong_outcome, slow = [], [], [], []
    worst_check, worst_finished, worst_caller = 0.0, 0.0, 0.0
    with MathVerifyReward(timeout_s=TIMEOUT_S, num_workers=2) as fn:
        fn.pool.warm_up()
        for case in corpus:
            start = time.perf_counter()
            outcome = fn.outcomes([case.response], [case.reference])[0]
            wall = time.perf_counter() - start
            score = float(outcome == Outcome.CORRECT)
            if score > case.math_verify:
                false_pos.append(case.name)
            elif score < case.math_verify:
                false_neg.append((case.name, outcome.name))
            if case.outcome is not None and outcome != case.outcome:
                wrong_outcome.append((case.name, outcome.name))
            if fn.last_check_seconds:
                worst_check = max(worst_check, *fn.last_check_seconds)
                if outcome != Outcome.TIMEOUT:
                    worst_finished = max(worst_finished, *fn.last_check_seconds)
                if max(fn.last_check_seconds) > TIMEOUT_S + KILL_SLACK_S:
                    slow.append((case.name, fn.last_check_seconds))
            else:
                worst_caller = max(worst_caller, wall)
                if wall > CALLER_BOUND_S:
                    slow.append((case.name, wall))
    print(f"\nreward corpus: {len(corpus)} cases, {len(false_pos)} false positives, {len(false_neg)} false "
          f"negatives; worst check {worst_check:.2f} s (limit {TIMEOUT_S} s; worst that finished "
          f"{worst_finished:.2f} s), worst caller-side case "
          f"{worst_caller:.3f} s, under {min(2, os.cpu_count() or 1)} CPU burners")
    assert not false_pos and not false_neg and not wrong_outcome and not slow, (false_pos, false_neg, wrong_outcome,
                                                                                slow)


# --- math-verify reward -----------------------------------------------------------------------------------------


def test_math_verify_without_fast_path():
    with MathVerifyReward(timeout_s=10.0, num_workers=1, fast_path=False) as fn:
        responses = ["\\boxed{27}", "\\boxed{3}", "\\boxed{\\frac{1}{3}}", "\\boxed{50\\%}"]
        scores = fn(responses, ["27", "4", "\\frac{1}{3}", "1"])
        assert scores == [1.0, 0.0, 1.0, 0.0]
        assert len(fn.last_check_seconds) == 4


def test_fast_path_skips_workers():
    fn = MathVerifyReward(num_workers=1, check=rc.never_check)
    responses = ["\\boxed{27.0}", "\\boxed{\\dfrac{1}{2}}", "nothing", "\\boxed{9007199254740993}"]
    assert fn(responses, ["27", "\\frac{1}{2}", "1", "9007199254740992"]) == [1.0, 1.0, 0.0, 0.0]
    assert fn.pool.processes == [] and fn.last_check_seconds == []
    assert fn.last_stats == RewardStats(responses=4, correct=2, no_answer=1)
    fn.close()


def test_reward_stats_count_every_zero():
    """Timeouts, crashes, check errors and malformed answers are counted apart from wrong answers."""
    with MathVerifyReward(timeout_s=1.0, num_workers=2, fast_path=False, check=rc.sleepy_check) as fn:
        responses = ["\\boxed{hang}", "\\boxed{crash}", "\\boxed{boom}", "\\boxed{malformed}", "none", "\\boxed{a}",
                     "\\boxed{b}", "\\boxed{a}"]
        scores = fn(responses, ["x", "x", "x", "x", "x", "a", "a", "a"])
        assert scores == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
        assert fn.last_stats == RewardStats(responses=8, correct=2, no_answer=2, reward_timeouts=1, reward_errors=2)
        assert fn.last_stats.metrics() == {"reward_timeouts": 1, "reward_errors": 2, "no_answer": 2}
        assert reward_stats(fn) is fn.last_stats and reward_stats(fn.__call__) is fn.last_stats
    assert reward_stats(exact_match_reward) is None


def test_reward_from_a_thread():
    with MathVerifyReward(timeout_s=10.0, num_workers=1, fast_path=False) as fn:
        out = []
        thread = threading.Thread(target=lambda: out.append(fn(["\\boxed{0.5}", "\\boxed{2}"], ["\\frac12", "3"])))
        thread.start()
        thread.join(120)
        assert out == [[1.0, 0.0]]


def test_reward_validates_input():
    fn = MathVerifyReward(num_workers=1, check=rc.never_check)
    with pytest.raises(ValueError, match="same length"):
        fn(["\\boxed{1}"], [])
    with pytest.raises(TypeError, match="responses must be a list of str, got NoneType"):
        fn([None], ["1"])
    with pytest.raises(TypeError, match="references must be a list of str, got int"):
        fn(["\\boxed{1}"], [1])
    with pytest.raises(TypeError, match="fast_path must be a bool"):
        MathVerifyReward(fast_path="yes")
    assert fn([], []) == []
    fn.close()


# --- get_reward_fn ----------------------------------------------------------------------------------------------


def test_get_reward_fn_names():
    with get_reward_fn("math_verify", timeout_s=3.0, num_workers=1) as fn:
        assert isinstance(fn, MathVerifyReward) and fn.pool.timeout_s == 3.0
    assert isinstance(get_reward_fn("hendrycks_math", unicode=False), HendrycksMathReward)
    with pytest.raises(ValueError, match="reward must be one of"):
        get_reward_fn("nope")
    register_reward_fn("always_one", lambda: lambda responses, references: [1.0] * len(responses))
    assert get_reward_fn("always_one")(["a", "b"], ["c", "d"]) == [1.0, 1.0]
    with pytest.raises(TypeError, match="factory must be callable"):
        register_reward_fn("bad", 3)
    with pytest.raises(ValueError, match="without ':'"):
        register_reward_fn("a:b", lambda: None)


def test_get_reward_fn_import_spec():
    fn = get_reward_fn("tests.reward_checks:constant_reward")
    assert fn(["x", "y"], ["1", "2"]) == [0.5, 0.5]
    assert reward_stats(fn) is None
    with pytest.raises(ValueError, match="must return a list of 2 floats, got 1 items"):
        get_reward_fn("tests.reward_checks:bad_length_reward")(["x", "y"], ["1", "2"])
    with pytest.raises(ValueError, match="returned nan at index 0"):
        get_reward_fn("tests.reward_checks:nan_reward")(["x"], ["1"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward_fn("tests.reward_checks:missing")
    with pytest.raises(ValueError, match="must name a callable, got int"):
        get_reward_fn("tests.reward_checks:NOT_CALLABLE")
    with pytest.raises(ValueError, match="takes no arguments"):
        get_reward_fn("tests.reward_checks:constant_reward", timeout_s=1.0)


@pytest.mark.parametrize("spec", ["math_verify", "hendrycks_math", "exact_match", "pkg.mod:fn", "m:obj.method"])
def test_check_reward_spec_accepts(spec):
    check_reward_spec(spec)


@pytest.mark.parametrize("spec", ["", "nope", "pkg.mod", ":fn", "pkg:", "a b:c", "pkg:fn()"])
def test_check_reward_spec_rejects(spec):
    with pytest.raises(ValueError, match="reward must be one of"):
        check_reward_spec(spec)
    with pytest.raises(TypeError, match="reward must be a str, got int"):
        check_reward_spec(3)


# --- the check pool ---------------------------------------------------------------------------------------------


def test_timeout_is_enforced_under_load(cpu_load):
    """A stuck check is killed at its deadline, with the CPUs busy; the next checks run on the replacement."""
    with_pool = CheckPool(rc.sleepy_check, num_workers=1, timeout_s=1.0)
    with_pool.warm_up()
    first = with_pool.processes[0]
    start = time.perf_counter()
    assert with_pool.run([("hang", "x")]) == [Outcome.TIMEOUT]
    assert time.perf_counter() - start < 1.0 + KILL_SLACK_S
    assert 1.0 <= with_pool.last_check_seconds[0] < 1.0 + KILL_SLACK_S
    assert not first.is_alive() and first.exitcode == -signal.SIGKILL
    assert with_pool.run([("a", "a"), ("a", "b")]) == [Outcome.CORRECT, Outcome.WRONG]
    with_pool.close()


def test_crash_is_retried_once(tmp_path):
    pool = CheckPool(functools.partial(rc.sleepy_check, marker_dir=str(tmp_path)), num_workers=1, timeout_s=5.0)
    assert pool.run([("crash_once", "x"), ("crash", "x"), ("b", "b")]) == [Outcome.CORRECT, Outcome.ERROR,
                                                                          Outcome.CORRECT]
    assert pool.run([("malformed", "x"), ("boom", "x")]) == [Outcome.NO_ANSWER, Outcome.ERROR]
    pool.close()


@pytest.mark.parametrize("killed", [1, 2])
def test_dead_idle_workers_are_replaced_before_dispatch(killed, caplog):
    """Workers killed while idle: the call right after still scores all 10 correct checks 1."""
    pool = CheckPool(rc.sleepy_check, num_workers=2, timeout_s=5.0)
    pool.warm_up()
    victims = pool.processes[:killed]
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.reward.pool"):
        assert pool.run([(str(i), str(i)) for i in range(10)]) == [Outcome.CORRECT] * 10
    assert not set(victims) & set(pool.processes)
    pool.close()


def test_replacement_still_starting_serves_the_next_call():
    """After a timeout the next call waits for the replacement, even when its start deadline passed meanwhile."""
    pool = CheckPool(rc.sleepy_check, num_workers=1, timeout_s=0.5, start_timeout_s=1.0)
    pool.warm_up()
    assert pool.run([("hang", "x")]) == [Outcome.TIMEOUT]
    assert pool.run([("a", "a")]) == [Outcome.CORRECT]  # right away: the replacement is starting
    assert pool.run([("hang", "x")]) == [Outcome.TIMEOUT]
    time.sleep(1.5)  # past the replacement's start deadline; it reported ready while nobody was listening
    assert pool.run([("a", "a")]) == [Outcome.CORRECT]
    pool.close()


def test_stuck_start_is_retried(tmp_path, caplog):
    check = functools.partial(rc.flaky_start_check, marker_dir=str(tmp_path))
    pool = CheckPool(check, num_workers=1, timeout_s=5.0, start_timeout_s=2.0)
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.reward.pool"):
        assert pool.run([("a", "a")]) == [Outcome.CORRECT]
    assert "not ready within start_timeout_s=2.0 s); attempt 1 of 3" in caplog.text
    pool.close()


def test_persistent_start_failure_raises_clearly(caplog):
    pool = CheckPool(rc.stuck_start_check, num_workers=1, timeout_s=1.0, start_timeout_s=1.0)
    with pytest.raises(RuntimeError, match=r"failed to start 3 times in a row; last cause: not ready within"):
        pool.run([("a", "a")])
    assert pool.processes == []
    pool = CheckPool(rc.broken_check, num_workers=1, timeout_s=1.0, max_start_failures=2)
    with (caplog.at_level(logging.WARNING, logger="dsrl_fast.reward.pool"),
          pytest.raises(RuntimeError, match="2 times in a row; last cause: ImportError: no checker backend")):
        pool.run([("a", "a")])
    assert caplog.text.count("failed to start (ImportError: no checker backend)") == 2
    pool.close()


def test_close_stops_workers():
    pool = CheckPool(rc.sleepy_check, num_workers=2, timeout_s=1.0)
    pool.warm_up()
    live = pool.processes
    pool.close()
    assert not any(p.is_alive() for p in live)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([("a", "a")])
    with pytest.raises(RuntimeError, match="closed"):
        pool.warm_up()


def _parent_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


@pytest.mark.skipif(DEFAULT_START_METHOD != "forkserver" or not Path("/proc").is_dir(),
                    reason="a fork server whose pid /proc gives (Linux)")
def test_killed_fork_server_is_restarted(caplog):
    """The fork server and every worker SIGKILLed at once, right before a call: that call used to end in an
    EOFError / BrokenPipeError traceback from multiprocessing (a replacement started through the dead server) or
    score a correct check TIMEOUT (its answer waited while the server restarted). Now every check is right, on
    workers of a new server; the server killed alone while the pool is idle is replaced too."""
    pool = CheckPool(rc.sleepy_check, num_workers=2, timeout_s=1.0)
    pool.warm_up()
    server = _parent_pid(pool.processes[0].pid)
    assert server != os.getpid()
    for pid in [p.pid for p in pool.processes] + [server]:
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.reward.pool"):
        assert pool.run([(str(i), str(i)) for i in range(6)]) == [Outcome.CORRECT] * 6
    new_server = _parent_pid(pool.processes[0].pid)
    assert new_server not in (server, os.getpid())
    os.kill(new_server, signal.SIGKILL)
    time.sleep(0.5)
    assert pool.run([("a", "a"), ("a", "b")]) == [Outcome.CORRECT, Outcome.WRONG]
    assert _parent_pid(pool.processes[0].pid) not in (new_server, os.getpid())
    pool.close()


@pytest.mark.skipif(DEFAULT_START_METHOD != "forkserver" or not Path("/proc").is_dir(),
                    reason="a fork server whose pid /proc gives (Linux)")
def test_fork_server_that_cannot_start_fails_in_one_line(caplog):
    """A fork server that dies at every start (tests/reward_dead_server.py): a one-line RuntimeError naming the
    cause after a few tries, never a multiprocessing traceback from inside the pool."""
    pool = CheckPool(rc.sleepy_check, num_workers=1, timeout_s=5.0)
    pool.warm_up()
    os.kill(_parent_pid(pool.processes[0].pid), signal.SIGKILL)
    pool.close()
    from tests.reward_dead_server import equal_check

    dead = CheckPool(equal_check, num_workers=1, timeout_s=5.0)
    with (caplog.at_level(logging.WARNING, logger="dsrl_fast.reward.pool"),
          pytest.raises(RuntimeError, match=r"^reward check workers cannot be started: 5 tries through the "
                                            r"'forkserver' start method failed; last cause: \w+Error") as err):
        dead.run([("a", "a")])
    assert "\n" not in str(err.value)
    assert caplog.text.count("could not be started") == 5
    dead.close()
    pool = CheckPool(rc.sleepy_check, num_workers=1, timeout_s=5.0, preload=("math_verify",))
    pool.warm_up()  # a working server again for the tests after this one
    assert pool.run([("a", "a")]) == [Outcome.CORRECT]
    pool.close()


def test_check_pool_validation():
    with pytest.raises(ValueError, match="num_workers must be an int >= 1"):
        CheckPool(rc.sleepy_check, num_workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s must be a number > 0"):
        CheckPool(rc.sleepy_check, num_workers=1, timeout_s=0)
    with pytest.raises(ValueError, match="start_timeout_s must be a number > 0"):
        CheckPool(rc.sleepy_check, num_workers=1, timeout_s=1.0, start_timeout_s=-1)
    with pytest.raises(ValueError, match="max_start_failures must be an int >= 1"):
        CheckPool(rc.sleepy_check, num_workers=1, timeout_s=1.0, max_start_failures=0)
    with pytest.raises(TypeError, match="check must be callable"):
        CheckPool("check", num_workers=1, timeout_s=1.0)
