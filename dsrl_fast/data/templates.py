"""Prompt templates: how a problem's text becomes the model's prompt string.

- ``"qwen3_non_thinking"`` (default): the paper's Qwen3 prompt with an empty think block.
- ``"chat"``: the tokenizer's own chat template, one user turn, generation prompt added.
- ``"plain"``: the problem text unchanged.

Any other string containing ``{problem}`` is used as a template itself (only ``{problem}`` is
substituted, so LaTeX braces elsewhere are safe).
"""

from __future__ import annotations

from typing import Any

__all__ = ["QWEN3_NON_THINKING", "TEMPLATES", "render_prompt"]

QWEN3_NON_THINKING = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n{problem}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)

TEMPLATES = ("qwen3_non_thinking", "chat", "plain")


def render_prompt(problem: str, template: str = "qwen3_non_thinking", tokenizer: Any = None) -> str:
    """The prompt string for ``problem``; ``tokenizer`` (with ``apply_chat_template``) only for "chat"."""
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    if template == "qwen3_non_thinking":
        return QWEN3_NON_THINKING.replace("{problem}", problem)
    if template == "plain":
        return problem
    if template == "chat":
        if not hasattr(tokenizer, "apply_chat_template"):
            got = type(tokenizer).__name__
            raise ValueError(f"template 'chat' needs a tokenizer with apply_chat_template, got {got}")
        messages = [{"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(template, str) and "{problem}" in template:
        return template.replace("{problem}", problem)
    raise ValueError(f"template must be one of {TEMPLATES} or a string containing '{{problem}}', got {template!r}")
