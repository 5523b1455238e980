"""Autograd function over the fused Triton log-prob kernels (see dsrl_fast/kernels/linear_logprobs.py).

Backward: rows with zero gradient are compacted away, then per vocabulary slice the Triton kernel writes dz and
two GEMMs (cuBLAS on CUDA) accumulate d_hidden in fp32 and write the d_weight slice once. Nothing is reduced with
atomics, so two runs give bitwise-identical gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsrl_fast.kernels import linear_logprobs as kernels
from dsrl_fast.ops.gemm import matmul_into
from dsrl_fast.torch_logprobs import active_rows


@dataclass(frozen=True)
class FusedOptions:
    """Non-tensor options of the fused op.

    temperature: logits divisor (> 0). with_entropy: also compute the softmax entropy.
    forward_config / dlogits_config: tile overrides for tuning; None takes the vetted default.
    slice_width: vocabulary columns per backward slice; None sizes it by kernels.slice_width.
    """

    temperature: float = 1.0
    with_entropy: bool = False
    forward_config: kernels.KernelConfig | None = None
    dlogits_config: kernels.KernelConfig | None = None
    slice_width: int | None = None


def sliced_backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    entropy: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
                    options: FusedOptions, compute_dh: bool,
                    compute_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d_hidden (N, H) in hidden's dtype and d_weight (V, H) in weight's dtype (None where not requested).

    grad_logprobs: (N,) fp32 or None (no gradient); grad_entropy: (N,) fp32 or None (the cheaper kernel variant
    runs); entropy must be given with grad_entropy. d_weight slices are written once from cuBLAS's fp32
    accumulators, so they equal an fp32 d_weight rounded once to the weight's dtype.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    idx = None
    if (compute_dh or compute_dw) and (grad_logprobs is not None or grad_entropy is not None):
        idx = active_rows(grad_logprobs, grad_entropy)
    if idx is None or idx.numel() == 0:
        return (torch.zeros_like(hidden) if compute_dh else None, torch.zeros_like(weight) if compute_dw else None)
    rows = idx.numel()
    compact = rows < n

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, idx).contiguous() if compact else t.contiguous()

    h_rows = take(hidden)
    g_logp = take(grad_logprobs.float()) if grad_logprobs is not None else lse.new_zeros(rows)
    g_ent = take(grad_entropy.float()) if grad_entropy is not None else None
    ent = take(entropy) if g_ent is not None else None
    labels_rows, lse_rows = take(labels), take(lse)
    inv_t = 1.0 / options.temperature
    width = min(options.slice_width or kernels.slice_width(v, hidden.element_size(), h_dim), v)
    dz = torch.empty((rows, width), dtype=hidden.dtype, device=hidden.device)
    dh_acc = torch.zeros((rows, h_dim), dtype=torch.float32, device=hidden.device) if compute_dh else None
    d_weight = torch.empty_like(weight) if compute_dw else None
    for v0 in range(0, v, width):
        cols = min(width, v - v0)
        dz_slice = dz[:, :cols]
        kernels.dlogits_slice(h_rows, weight, labels_rows, lse_rows, ent, g_logp, g_ent, inv_t, v0, dz_slice,
                              options.dlogits_config)
        if dh_acc is not None:
            matmul_into(dh_acc, dz_slice, weight[v0:v0 + cols], accumulate=True)
        if d_weight is not None:
            matmul_into(d_weight[v0:v0 + cols], dz_slice.T, h_rows, accumulate=False)
    del dz
    if dh_acc is None:
        return None, d_weight
    if not compact:
        return dh_acc.to(hidden.dtype), d_weight
    return torch.zeros_like(hidden).index_copy_(0, idx, dh_acc.to(hidden.dtype)), d_weight


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
        # An unused output's gradient arrives as None, not zeros: the entropy-gradient variant runs only when needed.
        ctx.set_materialize_grads(False)
        return label_logit - lse, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        options: FusedOptions = ctx.options
        if not options.with_entropy:
            grad_entropy = None
        d_hidden, d_weight = sliced_backward(
            hidden, weight, labels, lse, entropy if grad_entropy is not None else None, grad_logprobs, grad_entropy,
            options, compute_dh=ctx.needs_input_grad[0], compute_dw=ctx.needs_input_grad[1],
        )
        return d_hidden, d_weight, None, None
