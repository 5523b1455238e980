"""The embedded toy task: two-digit addition with a tiny Qwen3, built in code (nothing downloaded).

Prompt ``"Compute a+b."``, reference answer ``"S"``; the supervised target is
``"a+b=S \\boxed{S}"`` followed by EOS, so the reward reads the last ``\\boxed{}`` like on real math
data. The tokenizer is word level (each digit is a token) and the model a 2-layer Qwen3 that both
transformers and vLLM load, so the whole DSRL loop runs on a laptop CPU:
:func:`supervised_warmup` gives a weak starting policy, RL then improves its accuracy.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dsrl_fast.data import Problem
from dsrl_fast.reward import exact_match_reward
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

__all__ = [
    "BOS",
    "EOS",
    "IM_START",
    "PAD",
    "TOY_VOCAB",
    "build_tiny_qwen3",
    "build_toy_tokenizer",
    "encode_prompts",
    "greedy_accuracy",
    "make_addition_problems",
    "rollout_accuracy",
    "sampled_accuracy",
    "save_tiny_model",
    "sft_target",
    "supervised_warmup",
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
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TOY_VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
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


def build_tiny_qwen3(
    vocab_size: int,
    seed: int = 0,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Qwen3ForCausalLM:
    """A freshly initialized fp32 Qwen3: 2 layers, hidden 128, 4 heads (2 KV, head_dim 32), MLP 512,
    tied embeddings, 64 positions. The global RNG is left untouched."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for name, value in ids.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size):
            raise ValueError(f"{name} must be None or an int in [0, {vocab_size}), got {value!r}")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        dtype="float32",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return model


def save_tiny_model(model: Any, tokenizer: Any, directory: str | os.PathLike[str]) -> Path:
    """Write a Hugging Face model directory (config, safetensors, generation config, tokenizer) that
    ``transformers.AutoModelForCausalLM``/``AutoTokenizer`` and ``vllm.LLM`` load. Returns the path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sft_tensors(
    prompts: Sequence[list[int]], targets: Sequence[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding): both (P, L) int64."""
    length = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        end = len(prompt) + len(target)
        input_ids[i, :end] = torch.tensor(prompt + target)
        labels[i, len(prompt) : end] = torch.tensor(target)
    return input_ids, labels


def supervised_warmup(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
    target: Callable[[Problem], str] = sft_target,
    marginal_share: float = 0.0,
) -> list[float]:
    """Teacher-forced training on ``prompt + target(problem) + EOS`` with the loss on target tokens only.

    Each step draws ``batch_size`` problems uniformly (with replacement, seeded) and takes one
    AdamW step at ``lr``. Returns the per-step mean token cross-entropy (nats), one per step
    taken. The model's train/eval mode is restored afterwards and its gradients are cleared.
    ``should_stop`` is asked before every step; when it returns True the warm-up ends there
    (fewer losses than ``steps``: the model is part-trained, and the caller decides what to do
    with it). ``target`` gives each problem's supervised response: :func:`sft_target` for the addition
    task, :func:`dsrl_fast.toy_corrections.correction_target` for the self-correcting sums.
    ``marginal_share`` of the drawn rows (each row independently) are trained without their prompt, as
    ``<|im_start|> + target + EOS``: the sequence PreRL scores for the marginal log P(y). It is the toy's
    pre-training of that space, which a model warmed up on prompted rows only never learns.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, got {value!r}")
    if not problems:
        raise ValueError("problems must be non-empty, got 0 problems")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    device = next(model.parameters()).device
    if not callable(target):
        raise TypeError(f"target must be callable (Problem -> str), got {type(target).__name__}")
    if isinstance(marginal_share, bool) or not isinstance(marginal_share, (int, float)) or not 0 <= marginal_share <= 1:
        raise ValueError(f"marginal_share must be a number in [0, 1], got {marginal_share!r}")
    prompts = encode_prompts(tokenizer, problems)
    targets = [tokenizer(target(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in problems]
    if marginal_share > 0:  # rows len(problems).. are the same targets after the marginal-space context token
        prompts = prompts + [[tokenizer.convert_tokens_to_ids(IM_START)]] * len(problems)
        targets = targets + targets
    input_ids, labels = _sft_tensors(prompts, targets, tokenizer.pad_token_id)
    input_ids, labels = input_ids.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in range(steps):
            if should_stop is not None and should_stop():
                break
            rows = torch.randint(len(problems), (batch_size,), generator=generator)
            if marginal_share > 0:
                rows += len(problems) * (torch.rand(batch_size, generator=generator) < marginal_share)
            rows = rows.to(device)
            logits = model(input_ids=input_ids[rows], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[rows, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    finally:
        # The last step's gradients would otherwise be added to the caller's first backward (RL step 0).
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return torch.stack(losses).tolist() if losses else []


def rollout_accuracy(
    engine: RolloutEngine, tokenizer: Any, problems: Sequence[Problem], sampling: SamplingConfig
) -> float:
    """Fraction of sampled responses whose last ``\\boxed{}`` equals the reference
    (:func:`dsrl_fast.reward.exact_match_reward`), over ``sampling.n`` responses per problem."""
    if not problems:
        raise ValueError("problems must be non-empty, got 0 problems")
    rollouts = engine.generate(encode_prompts(tokenizer, problems), sampling)
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    scores = exact_match_reward(texts, [problems[r.prompt_index].answer for r in rollouts])
    return sum(scores) / len(scores)


def sampled_accuracy(
    engine: RolloutEngine,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
) -> float:
    """Accuracy of ``n`` samples per problem at ``temperature`` (seeded), stopping at EOS."""
    sampling = SamplingConfig(
        temperature=temperature, n=n, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,), seed=seed
    )
    return rollout_accuracy(engine, tokenizer, problems, sampling)


def greedy_accuracy(
    engine: RolloutEngine, tokenizer: Any, problems: Sequence[Problem], *, max_new_tokens: int = 32
) -> float:
    """Accuracy of greedy decoding, stopping at EOS."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    return rollout_accuracy(engine, tokenizer, problems, sampling)
