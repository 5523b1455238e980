"""Autograd function over the fused Triton log-prob kernels (see dsrl_fast/kernels/linear_logprobs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsrl_fast.kernels import linear_logprobs as kernels


@dataclass(frozen=True)
class FusedOptions:
    """Non-tensor options of the fused op.

    temperature: logits divisor (> 0). with_entropy: also compute the softmax entropy.
    forward_config / backward_config: tile overrides for tuning; None takes the vetted default.
    """

    temperature: float = 1.0
    with_entropy: bool = False
    forward_config: kernels.KernelConfig | None = None
    backward_config: kernels.KernelConfig | None = None


class TritonLinearLogprobs(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), labels (N,)) -> (logprobs (N,) fp32, entropy (N,) fp32 or empty)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                options: FusedOptions) -> tuple[torch.Tensor, torch.Tensor]:
        inv_t = 1.0 / options.temperature
        partials = kernels.forward_partials(hidden, weight, labels, inv_t, options.with_entropy,
                                            options.forward_config)
        lse, label_logit, entropy = kernels.combine_partials(partials)
        if not options.with_entropy:
            entropy = lse.new_empty(0)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.options = options
        ctx.mark_non_differentiable(labels)
        return label_logit - lse, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        options: FusedOptions = ctx.options
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if not options.with_entropy:
            grad_entropy = None
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        d_hidden, d_weight = kernels.backward(
            hidden, weight, labels, lse, entropy if grad_entropy is not None else None,
            grad_logprobs.float().contiguous(), grad_entropy, 1.0 / options.temperature,
            compute_dh=ctx.needs_input_grad[0], compute_dw=ctx.needs_input_grad[1],
            config=options.backward_config,
        )
        return (
            d_hidden.to(hidden.dtype) if d_hidden is not None else None,
            d_weight.to(weight.dtype) if d_weight is not None else None,
            None,
            None,
        )
