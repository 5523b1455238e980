"""The supervised warm-up: teacher-forced training on the toy task's targets, the weak starting policy RL improves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dsrl_fast.data.problems import Problem
from dsrl_fast.data.toy import encode_prompts, sft_target


def _sft_tensors(tokenizer: Any, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding): both (P, L) int64."""
    prompts = encode_prompts(tokenizer, problems)
    targets = [
        tokenizer(sft_target(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in problems
    ]
    length = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(problems), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(problems), length), -100, dtype=torch.long)
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
) -> list[float]:
    """Teacher-forced training on ``prompt + sft_target + EOS`` with the loss on target tokens only.

    Each step draws ``batch_size`` problems uniformly (with replacement, seeded) and takes one
    AdamW step at ``lr``. Returns the per-step mean token cross-entropy (nats), one per step
    taken. The model's train/eval mode is restored afterwards and its gradients are cleared.
    ``should_stop`` is asked before every step; when it returns True the warm-up ends there
    (fewer losses than ``steps``: the model is part-trained, and the caller decides what to do
    with it).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, got {value!r}")
    if not problems:
        raise ValueError("problems must be non-empty, got 0 problems")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    device = next(model.parameters()).device
    input_ids, labels = _sft_tensors(tokenizer, problems)
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
            rows = torch.randint(len(problems), (batch_size,), generator=generator).to(device)
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
