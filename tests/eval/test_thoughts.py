"""The paper's thought taxonomy (DESIGN.md §6) on hand-labelled responses."""

from __future__ import annotations

import pytest

from dsrl_fast.eval.thoughts import (
    PAPER_RULES,
    ThoughtCounts,
    ThoughtRules,
    classify_response,
    classify_step,
    count_thoughts,
    split_steps,
)


def test_design_worked_example():
    text = "Wait, let me check.\n\nBut x, however y.\n\nAlternatively, another approach.\n\nSo that's correct."
    assert classify_response(text) == ["reflection", "execution", "transition", "reflection"]
    counts = count_thoughts(text)
    assert counts == ThoughtCounts(transition=1, reflection=2, execution=1)
    assert counts.shares() == {"transition": 0.25, "reflection": 0.5, "execution": 0.25}


# (step, label) labelled by hand from Table 7's rules
HAND_LABELLED = [
    ("Alternatively we could factor the quadratic.", "transition"),
    ("ALTERNATIVELY: use symmetry.", "transition"),
    ("Let us think differently about the sum.", "transition"),
    ("Here is another way to see it: 3 + 4 = 7.", "transition"),
    ("Another approach is induction.", "transition"),
    ("We try another method.", "transition"),
    ("There may be another solution with x < 0.", "transition"),
    ("A better plan: another strategy based on parity.", "transition"),
    ("Use another technique.", "transition"),
    ("Wait, verify this with another approach.", "transition"),  # transition is checked first
    ("Wait. The sign is wrong.", "reflection"),
    ("waiting is not needed here", "reflection"),  # a prefix rule, not a word rule
    ("Now verify: 2 * 3 = 6.", "reflection"),
    ("We are verifying the bound.", "reflection"),  # substring: verify-ing
    ("To make sure, plug x = 3 back in.", "reflection"),
    ("Hold on, the domain excludes 0.", "reflection"),
    ("Let me think again about the limits.", "reflection"),
    ("So the answer's correct.", "reflection"),
    ("That's incorrect: 7 is prime.", "reflection"),
    ("let me check the arithmetic", "reflection"),
    ("This seems right.", "reflection"),
    ("But the problem asks for x^2. However we know x = 3.", "execution"),  # not the paper's keywords
    ("I will double-check the result and reconsider.", "execution"),
    ("The verification is done.", "execution"),  # "verification" does not contain "verify"
    ("So the answer is correct.", "execution"),  # no apostrophe-s
    ("We wait for nothing.", "execution"),  # "wait" not at the start
    ("Then x = 3, so \\boxed{9}.", "execution"),
]


@pytest.mark.parametrize(("step", "label"), HAND_LABELLED)
def test_hand_labelled_steps(step, label):
    assert classify_step(step) == label


def test_whole_response_from_hand_labels():
    steps = [step for step, _ in HAND_LABELLED]
    text = "\n\n".join(steps)
    assert classify_response(text) == [label for _, label in HAND_LABELLED]
    expected = ThoughtCounts(transition=10, reflection=11, execution=6)
    assert count_thoughts(text) == expected
    assert count_thoughts([text, text]) == expected + expected
    assert sum(count_thoughts(text).shares().values()) == pytest.approx(1.0)


def test_step_splitting():
    assert split_steps("a\n\nb") == ["a", "b"]
    assert split_steps("a\nb") == ["a\nb"]  # single newlines stay inside a step
    assert split_steps("  a \n\n\n\n b\n\n\n") == ["a", "b"]  # empty pieces are not steps
    assert split_steps("\n \n\n") == []
    assert split_steps("") == []
    # the prefix rule looks at the step's text after the blank line, leading spaces ignored
    assert classify_response("x = 1.\n\n  Wait, no.\n\n\nAlternatively, y.") == ["execution", "reflection", "transition"]
    # a keyword split across steps matches in neither
    assert classify_response("another\n\nway") == ["execution", "execution"]


def test_empty_response_has_no_steps():
    assert count_thoughts("") == ThoughtCounts(0, 0, 0)
    assert count_thoughts("").shares() == {"transition": 0.0, "reflection": 0.0, "execution": 0.0}
    assert count_thoughts([]) == ThoughtCounts()


def test_custom_rules():
    rules = ThoughtRules(transition_prefixes=("However",), transition_phrases=("instead",),
                         reflection_prefixes=(), reflection_phrases=("Double-check",))
    text = "However, x.\n\nWe use y instead.\n\nLet me DOUBLE-CHECK.\n\nAlternatively, z."
    assert classify_response(text, rules) == ["transition", "transition", "reflection", "execution"]
    assert PAPER_RULES.transition_prefixes == ("alternatively",)


def test_validation():
    with pytest.raises(TypeError, match="text must be a str"):
        split_steps(None)
    with pytest.raises(TypeError, match="step must be a str"):
        classify_step(3)
    with pytest.raises(TypeError, match="rules must be a ThoughtRules"):
        classify_step("x", rules={"transition": ["a"]})
    with pytest.raises(TypeError, match="transition_phrases must be a tuple of str"):
        ThoughtRules(("a",), "another way", (), ())
    with pytest.raises(ValueError, match="reflection_phrases must hold non-empty strings"):
        ThoughtRules(("a",), (), (), ("verify", " "))
