"""Every reference answer of the six shipped benchmark files scores 1 under both math rewards, as the paper scores them.

The files are the shipped ones (../shared/data/benchmarks), found the way `dsrl-fast eval` finds them
($DSRL_FAST_DATA), read by the real loaders and scored by the real rewards (`get_reward_fn`) in one batched call per
reward: `hendrycks_math`, `math_verify` as eval runs it, and `math_verify` with its fast path off, so that sympy
itself (in the reward's worker pool) parses and accepts every pair. Each answer is scored as two responses:

- the plain boxed form ``\\boxed{<reference as loaded>}``, what a model that is right writes;
- the stored form: the answer as the file spells it, boxed (Minerva: its whole worked solution, whose last box holds
  the answer; OlympiadBench: its list elements joined with ", ").

A stored form that a scorer cannot accept is listed below with the reason, and the test checks that exactly those
fail: nothing is skipped silently.
"""

from __future__ import annotations

import ast
import json
import re

import pytest

from dsrl_fast.eval.benchmarks import BENCHMARKS, load_eval_set, parse_data_specs
from dsrl_fast.reward import get_reward_fn
from tests.paths import REPO_ROOT

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA_DIR / "benchmarks").is_dir(),
                                reason=f"the shared benchmark files are not at {DATA_DIR}")

DOLLAR = re.compile(r"(?<!\\)\$")
AIME24_LEADING_ZEROS = {7: "25", 15: "73", 18: "23", 23: "45", 24: "33", 25: "80", 26: "55"}  # index: authors' answer
SIZES = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272, "olympiadbench": 675}


def hendrycks_stored_failures(stored: dict[str, list[str]]) -> dict[str, tuple[set[int], str]]:
    """The stored forms `hendrycks_math` (a string check) cannot score 1, per benchmark: (indices, reason)."""
    dollars = {i for i, text in enumerate(stored["olympiadbench"]) if DOLLAR.search(text)}
    assert len(dollars) == 266  # the figure of the review (265 of them wrong for a plain answer, one right anyway)
    return {
        "aime24": (set(AIME24_LEADING_ZEROS), "the file writes 025; the reference is 25 (the authors' file), and "
                                              "'025' != '25' as strings"),
        "amc23": (set(range(40)), "the file stores floats (27.0); the check has no trailing-.0 rule and the "
                                  "reference is the exact decimal 27"),
        "olympiadbench": (dollars, "the file keeps $...$ delimiters; the check drops only \\$, and the reference "
                                   "has none"),
        "minerva_math": ({72}, "its solution's box holds '+$ $' between two terms; the reference has no $"),
    }


@pytest.fixture(scope="module")
def answers() -> dict[str, tuple[list[str], list[str]]]:
    """{benchmark: (references as loaded, stored-form responses)} for every problem of every benchmark."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSRL_FAST_DATA", str(DATA_DIR))
        for name, fmt in BENCHMARKS.items():
            (spec,) = parse_data_specs(name)
            references = [p.answer for p in load_eval_set(spec).problems]
            path = DATA_DIR / "benchmarks" / name / "test.jsonl"
            rows = [json.loads(line, parse_float=str, parse_int=str) for line in path.open(encoding="utf-8")]
            stored = []
            for row in rows:
                value = row[fmt.answer_key]
                if fmt.answer_mode == "boxed":
                    stored.append(value)
                elif fmt.answer_mode == "list":
                    items = ast.literal_eval(value) if isinstance(value, str) else value
                    stored.append("\\boxed{" + ", ".join(items) + "}")
                else:
                    stored.append("\\boxed{" + value + "}")
            assert len(references) == len(stored) == SIZES[name], name
            out[name] = (references, stored)
    return out


def test_references_are_plain(answers):
    for name, (references, _) in answers.items():
        with_dollars = [a for a in references if DOLLAR.search(a)]
        leading_zeros = [a for a in references if re.fullmatch(r"[-+]?0\d+", a)]
        assert not with_dollars and not leading_zeros, (name, with_dollars[:3], leading_zeros[:3])
    aime24 = answers["aime24"][0]
    assert {i: aime24[i] for i in AIME24_LEADING_ZEROS} == AIME24_LEADING_ZEROS
    assert answers["olympiadbench"][0][1] == "\\frac{1}{2 n+2}"  # stored as ['$\\frac{1}{2 n+2}$']
    assert answers["minerva_math"][0][148] == "+2"  # the problem asks for "+n or -n": the sign stays


# The sympy run is 1,292 distinct checks: 16 s on 2 cores, 40-47 s when other jobs load them (up to 2.5 s for one
# check): its time limit is raised so that a busy machine cannot turn a slow check into a wrong answer here.
@pytest.mark.parametrize(("reward", "options"), [
    ("hendrycks_math", {}), ("math_verify", {}), ("math_verify", {"fast_path": False, "timeout_s": 60.0})],
    ids=["hendrycks", "math_verify", "math_verify_sympy"])
def test_every_answer_scores_one(answers, reward, options):
    names = list(answers)
    references = [ref for name in names for ref in answers[name][0]]
    plain = ["\\boxed{" + ref + "}" for ref in references]
    stored = [text for name in names for text in answers[name][1]]
    fn = get_reward_fn(reward, **options)
    try:
        scores = fn(plain + stored, references + references)
    finally:
        close = getattr(fn, "close", None)
        if close is not None:
            close()
    where = [(name, i) for name in names for i in range(len(answers[name][0]))]
    plain_wrong = [(w, r) for w, r, s in zip(where, references, scores[:len(where)], strict=True) if s != 1.0]
    assert not plain_wrong, f"{len(plain_wrong)} plain answers score 0: {plain_wrong[:5]}"
    stored_wrong = {w for w, s in zip(where, scores[len(where):], strict=True) if s != 1.0}
    expected = set()
    if reward == "hendrycks_math":
        failures = hendrycks_stored_failures({name: answers[name][1] for name in names})
        expected = {(name, i) for name, (indices, _) in failures.items() for i in indices}
    assert stored_wrong == expected, (sorted(stored_wrong - expected)[:5], sorted(expected - stored_wrong)[:5])
