"""The policy loss on the gradient-in-forward path (6·N·H·V, a chunk of fp32 logits as workspace).

The clipped loss is Σ_i w_i · ℓ_i(logp_i, entropy_i): the token weights w_i (aggregation, NSR/PSR filter, mask)
depend only on advantages, mask and sequence ids, and each ℓ_i only on its own token. So the gradient w.r.t. a
chunk's log-probs is known as soon as the chunk's logits are, and the op in dsrl_fast/ops/grad_in_forward.py turns
it into d_hidden and d_weight before the logits are dropped. The per-token gradient comes from autograd over the
loss's own code (`token_loss_terms`, restricted to the chunk with unit weights, then scaled by w_i), and the loss
value and metrics from one final call of it over all tokens, so the three paths share one definition of the loss.
"""

from __future__ import annotations

import dataclasses

import torch

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.ops.grad_in_forward import (
    GradInForwardOptions,
    PrecomputedGradients,
    logprobs_and_grads,
)
from dsrl_fast.loss.token_loss import PolicyLossOutput, kept_tokens, sequence_index, token_loss_terms, token_weights

# Below this many rows per chunk the GEMMs lose efficiency; `impl="auto"` then takes the no-logits path.
MIN_CHUNK_ROWS = 1024
DEFAULT_WORKSPACE_BYTES = 1 << 30


def chunk_rows(vocab: int, workspace_bytes: int) -> int:
    """Rows of fp32 logits (vocab × 4 bytes each) that fit in `workspace_bytes` (at least 1)."""
    return max(1, workspace_bytes // (vocab * 4))


def fits_budget(n: int, vocab: int, workspace_bytes: int) -> bool:
    """Whether the gradient-in-forward path runs efficiently within the budget: a chunk of min(n, MIN_CHUNK_ROWS)
    rows of fp32 logits fits."""
    return chunk_rows(vocab, workspace_bytes) >= min(n, MIN_CHUNK_ROWS)


def grad_in_forward_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                advantages: torch.Tensor, *, mask: torch.Tensor | None,
                                old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                                seq_ids: torch.Tensor | None, config: PolicyLossConfig, workspace_bytes: int,
                                weight_grad_fp32: bool) -> PolicyLossOutput:
    """policy_loss (validated inputs, see its contract) with the gradients computed in the forward.

    The returned logprobs and entropy carry no gradient: only the loss does (it is meant to be the output).
    """
    n = hidden.shape[0]
    device = hidden.device
    seq_index, num_seqs = sequence_index(seq_ids, n, device)
    kept = kept_tokens(advantages, torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask,
                        seq_index, num_seqs, config.samples)
    weights = token_weights(kept, seq_index, num_seqs, config) * config.loss_scale
    compute_dh = torch.is_grad_enabled() and hidden.requires_grad
    compute_dw = torch.is_grad_enabled() and weight.requires_grad
    # Each token's own loss term with weight 1 (its kept flag as mask); the chunk gradient is then scaled by w_i.
    unit = dataclasses.replace(config, samples="all", agg="token-mean", norm_tokens=1, loss_scale=1.0)
    entropy_grad = config.entropy_coef != 0

    def token_grad(idx: torch.Tensor, logp: torch.Tensor,
                   entropy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad():
            lp = logp.detach().requires_grad_()
            ent = entropy.detach().requires_grad_() if entropy is not None and entropy_grad else entropy
            loss, _ = token_loss_terms(
                lp, advantages[idx], entropy=ent, mask=kept[idx],
                old_logprobs=None if old_logprobs is None else old_logprobs[idx],
                ref_logprobs=None if ref_logprobs is None else ref_logprobs[idx], seq_ids=None, is_weights=None,
                config=unit)
            inputs = [lp] + ([ent] if entropy_grad and ent is not None else [])
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        w = weights[idx]
        g_logp = torch.zeros_like(lp) if grads[0] is None else grads[0] * w
        g_ent = None
        if len(grads) > 1:
            g_ent = torch.zeros_like(lp) if grads[1] is None else grads[1] * w
        return g_logp, g_ent

    chunk = min(n, chunk_rows(weight.shape[0], workspace_bytes))
    options = GradInForwardOptions(temperature=config.temperature, with_entropy=True, chunk_rows=max(chunk, 1),
                                   weight_grad_fp32=weight_grad_fp32)
    active = weights != 0
    grad_rows = None
    if compute_dh or compute_dw:
        idx = active.nonzero().squeeze(1)
        grad_rows = None if idx.numel() == n else idx
    with torch.no_grad():
        result = logprobs_and_grads(hidden, weight, labels, token_grad, options, grad_rows, compute_dh, compute_dw)
    entropy = result.entropy
    assert entropy is not None
    loss, metrics = token_loss_terms(result.logprobs, advantages, entropy=entropy, mask=mask,
                                       old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, seq_ids=seq_ids,
                                       is_weights=None, config=config)
    if compute_dh or compute_dw:
        loss = PrecomputedGradients.apply(loss.detach(), hidden, weight, result.d_hidden, result.d_weight)
    return PolicyLossOutput(loss, result.logprobs, entropy, metrics)
