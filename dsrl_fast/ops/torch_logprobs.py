"""Pure-PyTorch linear log-probs: the CPU path, chunked over tokens so no more than a chunk of logits is alive.

Same semantics as the fused Triton op: fp32 math whatever the input dtype, recomputation in the backward, rows with
zero gradient skipped.
"""

from __future__ import annotations

from typing import Any

import torch

# Rows per chunk are chosen so that one chunk of fp32 logits stays near this many elements (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _chunk_logits(hidden: torch.Tensor, weight32: torch.Tensor, inv_t: float) -> torch.Tensor:
    return (hidden.float() @ weight32.T) * inv_t


class ChunkedLinearLogprobs(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), labels (N,), temperature, with_entropy) -> (logprobs (N,), entropy (N,) or empty)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inv_t = 1.0 / temperature
        weight32 = weight.float()
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, n, step):
            rows = slice(start, start + step)
            z = _chunk_logits(hidden[rows], weight32, inv_t)
            chunk_lse = torch.logsumexp(z, dim=1)
            lse[rows] = chunk_lse
            logprobs[rows] = z.gather(1, labels[rows, None]).squeeze(1) - chunk_lse
            if with_entropy:
                entropy[rows] = chunk_lse - (torch.softmax(z, dim=1) * z).sum(dim=1)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.inv_t = inv_t
        ctx.with_entropy = with_entropy
        # An unused output's gradient arrives as None, not zeros: the entropy gradient is formed only when needed.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(saved[3])
        if not ctx.with_entropy:
            grad_entropy = None
        rows = active_rows(grad_logprobs, grad_entropy)
        d_hidden, d_weight = backward_rows(saved, grad_logprobs, grad_entropy, rows, ctx.inv_t,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return d_hidden, d_weight, None, None, None


def active_rows(grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> torch.Tensor:
    """(A,) int64 indices of rows whose log-prob or entropy gradient (N,) is nonzero (one host sync for A); at least
    one of the two is given."""
    grads = [g for g in (grad_logprobs, grad_entropy) if g is not None]
    assert grads
    active = grads[0] != 0
    for g in grads[1:]:
        active |= g != 0
    return active.nonzero().squeeze(1)


def backward_rows(saved: tuple[torch.Tensor, ...], grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
                  rows: torch.Tensor, inv_t: float, need_hidden: bool,
                  need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :class:`ChunkedLinearLogprobs` from the given rows only, a chunk of fp32 logits at a time.

    saved: (hidden (N, H), weight (V, H), labels (N,) int64, lse (N,) fp32, entropy (N,) fp32 or empty), as the
    forward saves them; grad_logprobs (N,); grad_entropy (N,) or None; rows: int64 indices of the rows to recompute
    (the others have zero gradient). Returns (d_hidden (N, H), d_weight (V, H)) in the inputs' dtypes, None where not
    needed.
    """
    hidden, weight, labels, lse, entropy = saved
    weight32 = weight.float()
    d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    step = _rows_per_chunk(weight.shape[0])
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        h = hidden[idx].float()
        z = (h @ weight32.T) * inv_t
        log_p = z - lse[idx, None]
        p = torch.exp(log_p)
        dz = -grad_logprobs[idx, None].float() * p
        dz.scatter_add_(1, labels[idx, None], grad_logprobs[idx, None].float())
        if grad_entropy is not None:
            dz -= grad_entropy[idx, None].float() * p * (log_p + entropy[idx, None])
        dz *= inv_t
        if d_hidden is not None:
            d_hidden[idx] = dz @ weight32
        if d_weight is not None:
            d_weight.addmm_(dz.T, h)
    return (None if d_hidden is None else d_hidden.to(hidden.dtype),
            None if d_weight is None else d_weight.to(weight.dtype))
