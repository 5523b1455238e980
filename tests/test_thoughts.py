"""Transition / reflection keyword counts on handcrafted responses."""

from __future__ import annotations

import pytest

from dsrl_fast.thoughts import REFLECTION_KEYWORDS, TRANSITION_KEYWORDS, ThoughtCounts, count_keywords, count_thoughts


def test_counts_on_a_response():
    text = (
        "First, 2x = 6 so x = 3. Wait, let me double-check: 2*3 = 6. "
        "But the problem asks for x^2. Alternatively, square both sides. "
        "Let me verify again: 9. However, I should reconsider the sign. Let me re-examine it and make sure."
    )
    # transitions: Wait, But, Alternatively, However; reflections: double-check, verify again, reconsider,
    # re-examine, make sure
    assert count_thoughts(text) == ThoughtCounts(transition=4, reflection=5)


def test_case_insensitive_and_word_boundaries():
    assert count_keywords("WAIT. wait, Wait!", ["wait"]) == 3
    assert count_keywords("await the waiter; butter, button, rebut", TRANSITION_KEYWORDS) == 0
    assert count_keywords("checking the checklist", REFLECTION_KEYWORDS) == 0
    assert count_keywords("unverified, verifying", ["verify"]) == 0


def test_longest_phrase_wins_without_double_counting():
    assert count_keywords("double-check", REFLECTION_KEYWORDS) == 1
    assert count_keywords("check again", REFLECTION_KEYWORDS) == 1
    assert count_keywords("verify again and verify", REFLECTION_KEYWORDS) == 2
    assert count_keywords("check, then check again", REFLECTION_KEYWORDS) == 2


def test_phrases_span_whitespace_and_prefix_rule():
    assert count_keywords("on the\nother   hand", TRANSITION_KEYWORDS) == 1
    assert count_keywords("Let me re-derive it. Let me recompute.", ["let me re-"]) == 1
    assert count_keywords("go over the steps", REFLECTION_KEYWORDS) == 1


def test_empty_and_plain_text():
    assert count_thoughts("") == ThoughtCounts(0, 0)
    assert count_thoughts("The sum is 12, so the answer is \\boxed{12}.") == ThoughtCounts(0, 0)


def test_validation():
    with pytest.raises(TypeError, match="text must be a str"):
        count_keywords(None, ["wait"])
    with pytest.raises(ValueError, match="keywords must be non-empty strings"):
        count_keywords("wait", [])
    with pytest.raises(ValueError, match="keywords must be non-empty strings"):
        count_keywords("wait", ["wait", " "])
