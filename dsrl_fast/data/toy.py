"""The embedded toy task: two-digit addition with a tiny Qwen3, built in code (nothing downloaded).

Prompt ``"Compute a+b."``, reference answer ``"S"``; the supervised target is
``"a+b=S \\boxed{S}"`` followed by EOS, so the reward reads the last ``\\boxed{}`` like on real math
data. The tokenizer is word level (each digit is a token) and the model a 2-layer Qwen3 that both
transformers and vLLM load (dsrl_fast/model/tiny.py), so the whole DSRL loop runs on a laptop CPU: the supervised
warm-up (dsrl_fast/train/warmup.py) gives a weak starting policy, RL then improves its accuracy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dsrl_fast.data.problems import Problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS",
    "EOS",
    "IM_START",
    "PAD",
    "TOY_VOCAB",
    "build_toy_tokenizer",
    "encode_prompts",
    "make_addition_problems",
    "sft_target",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
IM_START = "<|im_start|>"  # the marginal-space context token, as in Qwen tokenizers
_SPECIAL = (PAD, UNK, BOS, EOS, IM_START)
_WORDS = tuple("0123456789") + ("+", "=", ".", " ", "Compute", "\\boxed{", "}")
TOY_VOCAB: tuple[str, ...] = _SPECIAL + _WORDS
_PIECE_PATTERN = r"\\boxed\{|Compute|\d|[+=.} ]"


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """The toy word-level tokenizer (22 tokens; ids follow :data:`TOY_VOCAB`).

    Digits are single tokens, ``"\\boxed{"`` and ``"Compute"`` are whole tokens, the space is a
    token, and decoding concatenates pieces, so ``decode(encode(text)) == text`` for text made of
    the vocabulary. Encoding with ``add_special_tokens=True`` (the default) prepends ``<bos>``.
    """
    return word_level_tokenizer(TOY_VOCAB, _PIECE_PATTERN)


def word_level_tokenizer(vocab: Sequence[str], piece_pattern: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab` (ids in its order; its first five tokens are pad, unk, bos, eos and
    ``<|im_start|>``), splitting text into the pieces `piece_pattern` matches; encoding prepends ``<bos>`` and
    decoding concatenates the pieces. The toy tasks' tokenizers are built with it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate(vocab)}
    core = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(piece_pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    core.add_special_tokens(list(_SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


def make_addition_problems(n: int, seed: int = 0, low: int = 10, high: int = 99) -> list[Problem]:
    """``n`` distinct problems ``"Compute a+b."`` with ``a, b`` uniform in ``[low, high]``.

    The order is a seeded shuffle of all pairs, so slicing one list gives disjoint splits
    (``p = make_addition_problems(1200, seed); train, test = p[:1000], p[1000:]``). Each problem's
    ``meta`` holds ``{"a": a, "b": b}``.
    """
    for name, value in (("n", n), ("seed", seed), ("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= low <= high:
        raise ValueError(f"low and high must satisfy 0 <= low <= high, got low={low}, high={high}")
    n_pairs = (high - low + 1) ** 2
    if not 1 <= n <= n_pairs:
        raise ValueError(f"n must be in [1, {n_pairs}] (distinct pairs in [{low}, {high}]^2), got {n}")
    flat = random.Random(seed).sample(range(n_pairs), n)
    problems = []
    for k in flat:
        a, b = low + k // (high - low + 1), low + k % (high - low + 1)
        problems.append(Problem(f"Compute {a}+{b}.", str(a + b), {"a": a, "b": b}))
    return problems


def sft_target(problem: Problem) -> str:
    """The supervised response ``"a+b=S \\boxed{S}"`` (EOS is appended at tokenization)."""
    if not isinstance(problem, Problem) or not {"a", "b"} <= problem.meta.keys():
        raise ValueError(f"problem must be a Problem from make_addition_problems (meta a, b), got {problem!r}")
    a, b = problem.meta["a"], problem.meta["b"]
    return f"{a}+{b}={problem.answer} \\boxed{{{problem.answer}}}"


def encode_prompts(tokenizer: Any, problems: Sequence[Problem]) -> list[list[int]]:
    """Prompt token ids (``<bos>`` first) of each problem's text."""
    return [tokenizer(p.prompt_text)["input_ids"] for p in problems]
