"""Prompt templates: the paper's Qwen3 string, a real tokenizer's chat template, plain and custom."""

from __future__ import annotations

import pytest

from dsrl_fast.data.templates import render_prompt

PROBLEM = "Find $x$ if $\\frac{x}{2} = \\{3\\}$."


def test_qwen3_non_thinking_exact_string():
    expected = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n" + PROBLEM + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render_prompt(PROBLEM) == expected
    assert render_prompt(PROBLEM, "qwen3_non_thinking") == expected


def test_plain_and_custom():
    assert render_prompt(PROBLEM, "plain") == PROBLEM
    assert render_prompt(PROBLEM, "Q: {problem}\nA: \\boxed{}") == "Q: " + PROBLEM + "\nA: \\boxed{}"


def test_chat_uses_tokenizer_template():
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template)
    expected = "<|im_start|>user\n" + PROBLEM + "<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(PROBLEM, "chat", tokenizer=tok) == expected


def test_validation():
    with pytest.raises(ValueError, match="needs a tokenizer with apply_chat_template"):
        render_prompt(PROBLEM, "chat")
    with pytest.raises(ValueError, match="template must be one of"):
        render_prompt(PROBLEM, "qwen4")
    with pytest.raises(TypeError, match="problem must be a str"):
        render_prompt(3)
