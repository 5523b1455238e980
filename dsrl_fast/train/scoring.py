"""Packing a rollout batch's samples into micro-batches and scoring them with the policy (or any scorer).

A sample list becomes packed micro-batches within a token budget (`packed_micro_batches`), each remembering which
samples it holds; `score` runs a scorer over them without gradient and hands each sample its per-token log-probs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsrl_fast.distributed import reduce_floats
from dsrl_fast.data.packing import PackedBatch, build_micro_batches
from dsrl_fast.loss.logprobs import linear_logprobs
from dsrl_fast.model.packed import gathered, lm_head_weight, packed_hidden_states
from dsrl_fast.train.rl_step import PACK_SPACE, StepSamples

ScoreFn = Callable[[PackedBatch], torch.Tensor]


@dataclass(frozen=True)
class Micro:
    owners: list[int] | None  # indices into the step's samples; None: a zero-weight filler
    batch: PackedBatch


def packed_micro_batches(samples: StepSamples, idx: Sequence[int], space: str, max_tokens: int,
            prefix: Sequence[int]) -> list[Micro]:
    """Micro-batches of samples `idx` in `space`, padded with fillers to the same count on every rank."""
    micro = [
        Micro([idx[j] for j in local], batch)
        for local, batch in build_micro_batches([samples.prompt_ids[i] for i in idx],
                                                [samples.response_ids[i] for i in idx], PACK_SPACE[space],
                                                max_tokens, prefix=prefix)
    ] if idx else []
    (count,) = reduce_floats([float(len(micro))], dist.ReduceOp.MAX)
    if len(micro) < count:
        (_, filler), = build_micro_batches([samples.prompt_ids[0]], [samples.response_ids[0]], PACK_SPACE[space],
                                           max_tokens, prefix=prefix)
        micro += [Micro(None, filler)] * (int(count) - len(micro))
    return micro


def score(micro: list[Micro], fn: ScoreFn, num_samples: int, device: torch.device) -> list[torch.Tensor | None]:
    """Per-sample (L_i,) fp32 scores of a no-grad pass (None for samples not in `micro`)."""
    out: list[torch.Tensor | None] = [None] * num_samples
    with torch.no_grad():
        for m in micro:
            batch = m.batch.to(device)
            scores = fn(batch).float()
            if m.owners is None:
                continue
            for s, chunk in zip(batch.seq_sample_host, scores.split(list(batch.seq_response_lens))):
                out[m.owners[s]] = chunk
    return out


def policy_logprob_fn(model: torch.nn.Module, temperature: float) -> ScoreFn:
    """Log-probs of a packed batch's scored tokens under `model` (fused kernel on CUDA; gathered under ZeRO-3)."""

    def score(batch: PackedBatch) -> torch.Tensor:
        hidden = packed_hidden_states(model, batch)
        labels = batch.labels.index_select(0, batch.masked_idx)
        with gathered(lm_head_weight(model)) as weight:
            return linear_logprobs(hidden, weight, labels, temperature=temperature).logprobs

    return score


def filled(values: list[torch.Tensor | None], lengths: list[int], device: torch.device) -> list[torch.Tensor]:
    """`values` with zeros for missing samples (only zero-weight fillers ever read those)."""
    return [v if v is not None else torch.zeros(n, device=device) for v, n in zip(values, lengths)]


def padded(values: list[torch.Tensor], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) fp32 right-padded values and the (B, L) bool mask."""
    width = max(lengths)
    out = values[0].new_zeros(len(values), width)
    mask = torch.zeros(len(values), width, dtype=torch.bool, device=out.device)
    for i, (v, n) in enumerate(zip(values, lengths)):
        out[i, :n] = v
        mask[i, :n] = True
    return out, mask


def rows(padded: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [padded[i, :n] for i, n in enumerate(lengths)]


def subset(samples: StepSamples, idx: list[int]) -> StepSamples:
    return StepSamples([samples.prompt_ids[i] for i in idx], [samples.response_ids[i] for i in idx],
                       [samples.sampler_logprobs[i] for i in idx], samples.rewards[idx], samples.group_ids[idx])


def token_mean(values: list[torch.Tensor | None]) -> float | None:
    """Global mean over every token of the present samples (None when no rank has one)."""
    present = [v for v in values if v is not None]
    local = [float(sum(float(v.sum()) for v in present)), float(sum(v.numel() for v in present))]
    total, count = reduce_floats(local)
    return total / count if count else None
