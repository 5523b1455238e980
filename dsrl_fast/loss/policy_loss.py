"""The clipped policy loss (GRPO / NSR / PSR, conditional or marginal) from hidden states, on the fused log-probs.

The loss itself is `token_policy_loss` (dsrl_fast/loss/token_loss.py); its gradient w.r.t. the log-probs flows into
the fused op's backward, which is where the O(N·H·V) work lives, or, on the gradient-in-forward path, is applied
chunk by chunk in the forward (dsrl_fast/loss/grad_in_forward.py).
"""

from __future__ import annotations

import torch

from dsrl_fast.loss import grad_in_forward as gif
from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.loss.logprobs import raw_linear_logprobs, validate_linear_inputs
from dsrl_fast.loss.token_loss import PolicyLossOutput, token_loss_terms
from dsrl_fast.ops.validation import check_rows, check_same_device, check_tensor, resolve_impl


def _validate_loss_inputs(n: int, hidden: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None,
                          old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                          seq_ids: torch.Tensor | None, config: PolicyLossConfig) -> None:
    check_tensor("advantages", advantages, ndim=1, dtypes=(torch.float32, torch.float16, torch.bfloat16,
                                                           torch.float64))
    check_rows("advantages", advantages, n)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=(torch.float32, torch.float64))
            check_rows(name, t, n)
    if mask is not None:
        check_tensor("mask", mask, ndim=1, dtypes=(torch.bool,))
        check_rows("mask", mask, n)
    if seq_ids is not None:
        check_tensor("seq_ids", seq_ids, ndim=1, dtypes=(torch.int64, torch.int32))
        check_rows("seq_ids", seq_ids, n)
    check_same_device("hidden", hidden, advantages=advantages, mask=mask, old_logprobs=old_logprobs,
                      ref_logprobs=ref_logprobs, seq_ids=seq_ids)
    if config.agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm") and seq_ids is None:
        raise ValueError(f"agg={config.agg!r} needs seq_ids (N,) int64, got None")
    if config.kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs (N,) fp32, got None")
    if n and bool(torch.isnan(advantages).any()):
        raise ValueError("advantages must not contain NaN, got at least one NaN")


LOSS_IMPLS = ("auto", "triton", "grad_in_forward", "torch")


def _resolve_loss_impl(impl: str, hidden: torch.Tensor, weight: torch.Tensor, workspace_bytes: int | None,
                       weight_grad_fp32: bool) -> str:
    """Check the path options and map impl to "triton", "grad_in_forward" or "torch" (see policy_loss)."""
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes <= 0):
        raise ValueError(f"workspace_bytes must be a positive int or None, got {workspace_bytes!r}")
    if not isinstance(weight_grad_fp32, bool):
        raise TypeError(f"weight_grad_fp32 must be a bool, got {type(weight_grad_fp32).__name__}")
    chosen = resolve_impl(impl, hidden.device, choices=LOSS_IMPLS)
    if chosen == "grad_in_forward":
        resolve_impl("triton", hidden.device)
        return chosen
    budget = gif.DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if impl == "auto" and chosen == "triton" and needs_grad and gif.fits_budget(hidden.shape[0], weight.shape[0],
                                                                                 budget):
        return "grad_in_forward"
    return chosen


def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
                mask: torch.Tensor | None = None, old_logprobs: torch.Tensor | None = None,
                ref_logprobs: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                config: PolicyLossConfig = PolicyLossConfig(), impl: str = "auto", workspace_bytes: int | None = None,
                weight_grad_fp32: bool = False) -> PolicyLossOutput:
    """Clipped policy-gradient loss straight from final hidden states and the LM-head weight.

    Args:
        hidden: (N, H) fp32/fp16/bf16 final hidden states of the scored tokens.
        weight: (V, H) LM-head weight, same dtype/device.
        labels: (N,) int64 in [0, V): the tokens being scored.
        advantages: (N,) fp32 per-token advantage (constant within a sequence).
        mask: (N,) bool, tokens that count (None = all).
        old_logprobs: (N,) fp32 behaviour-policy log-probs; None = on-policy (old = logprobs.detach()).
        ref_logprobs: (N,) fp32 reference log-probs for the KL penalty (needed when config.kl_coef != 0).
        seq_ids: (N,) int64 sequence of each token (needed by the seq-mean aggregations; with `samples` it makes the
            NSR/PSR filter act per sequence, otherwise per token).
        config: PolicyLossConfig (clip, dual clip, temperature, samples, agg, KL, entropy).
        impl: "auto", "triton" (no logits kept: 8·N·H·V, recomputed in the backward), "grad_in_forward" (the
            gradients are computed during the forward from chunks of fp32 logits: 6·N·H·V; logprobs and entropy
            are then returned without gradient) or "torch" (the PyTorch reference). "auto" is "torch" off CUDA;
            on CUDA it is "grad_in_forward" when a gradient is needed and a chunk of
            min(N, grad_in_forward_loss.MIN_CHUNK_ROWS) fp32 logit rows fits in workspace_bytes, else "triton".
        workspace_bytes: memory budget of the gradient-in-forward path's fp32 logits chunk (chunk × V × 4 bytes);
            None = grad_in_forward_loss.DEFAULT_WORKSPACE_BYTES (1 GiB).
        weight_grad_fp32: on the gradient-in-forward path, accumulate d_weight over chunks in fp32 (V × H × 4 bytes
            more) rather than in the weight's dtype; the gradient is handed over in the weight's dtype either way.
            No effect on the other paths: "triton" writes each d_weight slice once from cuBLAS's fp32 accumulator,
            "torch" accumulates in fp32 already.

    Returns:
        PolicyLossOutput(loss, logprobs, entropy, metrics). Gradients flow to hidden and weight only. With no kept
        token the loss is 0 with a zero gradient.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    validate_linear_inputs(hidden, weight, labels, config.temperature)
    n = hidden.shape[0]
    _validate_loss_inputs(n, hidden, advantages, mask, old_logprobs, ref_logprobs, seq_ids, config)
    chosen = _resolve_loss_impl(impl, hidden, weight, workspace_bytes, weight_grad_fp32)
    if chosen == "grad_in_forward":
            return gif.grad_in_forward_policy_loss(
            hidden, weight, labels, advantages, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
            seq_ids=seq_ids, config=config, weight_grad_fp32=weight_grad_fp32,
            workspace_bytes=gif.DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes)
    logprobs, entropy = raw_linear_logprobs(hidden, weight, labels, config.temperature, True, chosen,
                                            config.skip_threshold)
    loss, metrics = token_loss_terms(logprobs, advantages, entropy=entropy, mask=mask, old_logprobs=old_logprobs,
                                       ref_logprobs=ref_logprobs, seq_ids=seq_ids, is_weights=None, config=config)
    return PolicyLossOutput(loss, logprobs, entropy, metrics)
