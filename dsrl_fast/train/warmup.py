"""The supervised warm-up: teacher-forced training on the toy task's targets, the weak starting policy RL improves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dsrl_fast.data.problems import Problem
from dsrl_fast.data.toy import IM_START, encode_prompts, sft_target


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
    task, :func:`dsrl_fast.data.toy_corrections.correction_target` for the self-correcting sums.
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
