"""The supervised warm-up: teacher-forced training on the toy task's targets, the weak starting policy RL improves.

With ``sft.target_accuracy`` set it trains until a check of the model's accuracy on problems it does not train on
reaches the target (``sft.steps`` is then the cap), so the starting point RL sees does not move with the speed of
the warm-up (which shifts with dependency versions and seeds: the toy's learning curve is steep there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dsrl_fast.data.problems import Problem
from dsrl_fast.data.toy import IM_START, encode_prompts, sft_target
from dsrl_fast.train.metrics_log import print0
from dsrl_fast.train.sections import SFTConfig

__all__ = ["WarmupResult", "supervised_warmup"]


@dataclass(frozen=True)
class WarmupResult:
    """What the warm-up did.

    losses: mean token cross-entropy (nats) of each step taken.
    checks: (steps done, accuracy) of each accuracy check, in order (empty without a measure).
    reached: True when a check reached sft.target_accuracy (the warm-up stopped there), False when the step cap
        came first, None without a target.
    """

    losses: list[float]
    checks: list[tuple[int, float]] = field(default_factory=list)
    reached: bool | None = None

    @property
    def steps(self) -> int:
        """Supervised steps taken."""
        return len(self.losses)


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
    sft: SFTConfig,
    seed: int = 0,
    *,
    measure: Callable[[], float] | None = None,
    should_stop: Callable[[], bool] | None = None,
    target: Callable[[Problem], str] = sft_target,
    marginal_share: float = 0.0,
) -> WarmupResult:
    """Teacher-forced training on ``prompt + target(problem) + EOS`` with the loss on target tokens only.

    Each step draws ``sft.batch_size`` of `problems` uniformly (with replacement, from a generator seeded with
    `seed`; the global RNG is not used) and takes one AdamW step at ``sft.lr``. Every ``sft.eval_every`` steps (and
    after the last) it prints a line with the step's loss and, given `measure` (the model's accuracy now, in
    [0, 1]; it must leave the global RNG alone), the measured accuracy. With ``sft.target_accuracy`` set the
    warm-up ends at the first check whose accuracy reaches it, else after ``sft.steps`` steps. ``should_stop`` is
    asked before every step; when it returns True the warm-up ends there (the model is part-trained, and the
    caller decides what to do with it). The model's train/eval mode is restored and its gradients are cleared.
    ``target`` gives each problem's supervised response: :func:`sft_target` for the addition task,
    :func:`dsrl_fast.data.toy_corrections.correction_target` for the self-correcting sums. ``marginal_share`` of the
    drawn rows (each row independently) are trained without their prompt, as ``<|im_start|> + target + EOS``: the
    sequence PreRL scores for the marginal log P(y), the toy's pre-training of that space (a model warmed up on
    prompted rows only never learns it).
    """
    if not isinstance(sft, SFTConfig):
        raise TypeError(f"sft must be an SFTConfig, got {type(sft).__name__}")
    if sft.steps < 1:
        raise ValueError(f"sft.steps must be >= 1 for a warm-up, got {sft.steps}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not problems:
        raise ValueError("problems must be non-empty, got 0 problems")
    if sft.target_accuracy is not None and measure is None:
        raise ValueError(f"measure must be given with sft.target_accuracy={sft.target_accuracy}, got None")
    if not callable(target):
        raise TypeError(f"target must be callable (Problem -> str), got {type(target).__name__}")
    if isinstance(marginal_share, bool) or not isinstance(marginal_share, (int, float)) or not 0 <= marginal_share <= 1:
        raise ValueError(f"marginal_share must be a number in [0, 1], got {marginal_share!r}")
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, problems)
    targets = [tokenizer(target(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in problems]
    if marginal_share > 0:  # rows len(problems).. are the same targets after the marginal-space context token
        prompts = prompts + [[tokenizer.convert_tokens_to_ids(IM_START)]] * len(problems)
        targets = targets + targets
    input_ids, labels = _sft_tensors(prompts, targets, tokenizer.pad_token_id)
    input_ids, labels = input_ids.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr)
    was_training = model.training
    model.train()
    losses: list[torch.Tensor] = []
    checks: list[tuple[int, float]] = []
    reached = None if sft.target_accuracy is None else False
    try:
        for step in range(sft.steps):
            if should_stop is not None and should_stop():
                break
            rows = torch.randint(len(problems), (sft.batch_size,), generator=generator)
            if marginal_share > 0:
                rows += len(problems) * (torch.rand(sft.batch_size, generator=generator) < marginal_share)
            rows = rows.to(device)
            logits = model(input_ids=input_ids[rows], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[rows, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            done = step + 1
            if done % sft.eval_every and done < sft.steps:
                continue
            # A check: measure, report, and stop once the target is reached.
            accuracy = None if measure is None else float(measure())
            if accuracy is not None:
                checks.append((done, accuracy))
            print0(_progress_line(sft, done, float(losses[-1]), accuracy))
            if sft.target_accuracy is not None and accuracy is not None and accuracy >= sft.target_accuracy:
                reached = True
                break
    finally:
        # The last step's gradients would otherwise be added to the caller's first backward (RL step 0).
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return WarmupResult(torch.stack(losses).tolist() if losses else [], checks, reached)


def _progress_line(sft: SFTConfig, done: int, loss: float, accuracy: float | None) -> str:
    """``warm-up 100/600: loss 0.812, accuracy 0.145 (target 0.250)``."""
    line = f"warm-up {done}/{sft.steps}: loss {loss:.3f}"
    if accuracy is not None:
        line += f", accuracy {accuracy:.3f}"
        if sft.target_accuracy is not None:
            line += f" (target {sft.target_accuracy:.3f})"
    return line
