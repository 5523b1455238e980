"""CPU stand-in for vllm.inputs (tests only)."""

from __future__ import annotations


class TokensPrompt(dict):
    """vLLM's TokensPrompt is a TypedDict: a dict with prompt_token_ids."""
