"""`linear_logprobs`: token log-probs (and entropy) of labels under softmax(hidden @ weight.T / temperature)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dsrl_fast.ops.tile_skip import DEFAULT_THRESHOLD as DEFAULT_SKIP_THRESHOLD
from dsrl_fast.ops.torch_logprobs import ChunkedLinearLogprobs
from dsrl_fast.ops.validation import (
    FLOAT_DTYPES,
    check_labels_in_range,
    check_rows,
    check_same_device,
    check_tensor,
    resolve_impl,
)


class LogProbs(NamedTuple):
    """logprobs: (N,) fp32. entropy: (N,) fp32, or None unless requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def validate_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           temperature: float) -> None:
    """Check the shared inputs of linear_logprobs and policy_loss (see linear_logprobs for the contract)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[1]}) to match hidden (N, H), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, H)")
    check_rows("labels", labels, hidden.shape[0])
    check_same_device("hidden", hidden, weight=weight, labels=labels)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    check_labels_in_range(labels, weight.shape[0])


def raw_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                        with_entropy: bool, impl: str,
                        skip_threshold: float | None = DEFAULT_SKIP_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch without validation: (logprobs (N,) fp32, entropy (N,) fp32 or empty). impl is "triton" or "torch";
    skip_threshold: the Triton backward's vocabulary-tile skipping (PolicyLossConfig.skip_threshold)."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0 + weight.sum() * 0
        return empty, empty
    if impl == "triton":
        from dsrl_fast.ops.linear_logprobs import FusedOptions, TritonLinearLogprobs

        hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
        weight = weight if weight.stride(1) == 1 else weight.contiguous()
        options = FusedOptions(temperature=float(temperature), with_entropy=with_entropy,
                               skip_threshold=skip_threshold)
        return TritonLinearLogprobs.apply(hidden, weight, labels.contiguous(), options)
    return ChunkedLinearLogprobs.apply(hidden, weight, labels, float(temperature), with_entropy)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                    with_entropy: bool = False, impl: str = "auto") -> LogProbs:
    """Log-prob of each label under softmax(hidden @ weight.T / temperature), without materializing all logits.

    Args:
        hidden: (N, H) fp32/fp16/bf16 final hidden states (one row per scored token).
        weight: (V, H) LM-head weight, same dtype and device as hidden.
        labels: (N,) int64 token ids in [0, V).
        temperature: logits divisor, > 0 (use the sampler's temperature).
        with_entropy: also return the entropy of each row's distribution.
        impl: "auto" (Triton on CUDA, PyTorch otherwise), "triton" or "torch".

    Returns:
        LogProbs(logprobs (N,) fp32, entropy (N,) fp32 or None). Differentiable w.r.t. hidden and weight.
    """
    validate_linear_inputs(hidden, weight, labels, temperature)
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy must be a bool, got {type(with_entropy).__name__}")
    chosen = resolve_impl(impl, hidden.device)
    logprobs, entropy = raw_linear_logprobs(hidden, weight, labels, temperature, with_entropy, chosen)
    return LogProbs(logprobs, entropy if with_entropy else None)
