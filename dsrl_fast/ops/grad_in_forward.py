"""Gradient-in-forward log-probs: when the loss is the output, d_hidden and d_weight are computed during the forward.

For a loss Σ_i f_i(logp_i, entropy_i) whose per-token gradient is known once a row's log-prob is (a policy loss
with advantages, old/ref log-probs and token weights fixed before the forward), each chunk of C rows runs:
cuBLAS logits in fp32 (2·C·H·V), the Triton row kernels (statistics, then d_logits written over the logits,
kernels/logits_rows.py), cuBLAS d_hidden = dz·W (2·C·H·V) and d_weight += dzᵀ·h (2·C·H·V): 6·N·H·V in
all, the FLOPs of a method that materializes logits, at a workspace of C × V × 4 bytes. Rows that cannot have a
gradient (their token weight is 0) are moved out first and only get the logits GEMM. Everything is grid-ordered
or inside GEMMs: bitwise-deterministic. Predicted (bench/roofline.py): 79-80% of the 6·N·H·V cuBLAS rate at
Qwen3-4B and 84-85% at -8B on an H100, 83-85% and 87-89% on an H200 (N = 8k/16k); the row kernels' HBM streams
(10·C·V bytes per chunk) are most of the gap, and the d_hidden GEMM (C × H, K = V) relies on cuBLAS splitting K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from dsrl_fast.ops.gemm import matmul_into

# (row indices (C,) int64, logprobs (C,) fp32, entropy (C,) fp32 or None) -> (d loss / d logprobs (C,) fp32,
# d loss / d entropy (C,) fp32 or None when the loss does not depend on the entropy).
TokenGradFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                       tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class GradInForwardOptions:
    """temperature: logits divisor (> 0). with_entropy: also return the entropy. chunk_rows: rows per chunk (the
    workspace is chunk_rows × V × 4 bytes). weight_grad_fp32: accumulate d_weight over chunks in fp32 (V × H × 4
    bytes, and V × H × 2 more while it is cast at the end) instead of the weight's dtype (V × H × 2 bytes, one
    rounding per chunk); either way it is handed to autograd in the weight's dtype.

    Error of a bf16 d_weight against float64 (rms over all elements / rms of the truth, 12 chunks of 256 rows,
    H = 256, V = 4099, bf16 dz; a CPU run of the same GEMM sequence): 4.4e-3 accumulated in bf16, 2.3e-3 in fp32
    (the review measured 4.7e-3 / 2.8e-3 on its shape); in fp16 5.7e-4 / 2.9e-4. The bf16 error grows with the
    number of chunks (1 chunk: 2.3e-3), the fp32 one does not.
    """

    temperature: float = 1.0
    with_entropy: bool = True
    chunk_rows: int = 1024
    weight_grad_fp32: bool = True


class ForwardResult(NamedTuple):
    """logprobs, entropy: (N,) fp32 (entropy None unless requested), detached. d_hidden: (N, H) in hidden's dtype,
    d_weight: (V, H) in weight's dtype; None when not requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    d_hidden: torch.Tensor | None
    d_weight: torch.Tensor | None


def _dz_view(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (C, V) `dtype` view over the first bytes of each row of the fp32 buffer z (C, V)."""
    return z if dtype == torch.float32 else z.view(dtype)[:, :z.shape[1]]


def logprobs_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_grad: TokenGradFn,
                       options: GradInForwardOptions, grad_rows: torch.Tensor | None, compute_dh: bool,
                       compute_dw: bool) -> ForwardResult:
    """Log-probs of `labels` under softmax(hidden @ weight.T / temperature) and the gradients of the loss.

    hidden: (N, H) fp32/fp16/bf16, weight: (V, H) same dtype, labels: (N,) int64. grad_rows: (A,) int64 sorted
    indices of the rows that may have a nonzero gradient (None: all rows); the others get only their log-probs.
    """
    from dsrl_fast.kernels import logits_rows  # Triton loads on first use: `import dsrl_fast` needs only PyTorch

    n, h_dim = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    inv_t = 1.0 / options.temperature
    with_grad = compute_dh or compute_dw
    logprobs = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty(n, dtype=torch.float32, device=device) if options.with_entropy else None
    d_hidden = (torch.zeros_like(hidden) if grad_rows is not None else torch.empty_like(hidden)) if compute_dh \
        else None
    acc_dtype = torch.float32 if options.weight_grad_fp32 else weight.dtype
    d_weight = torch.zeros((v, h_dim), dtype=acc_dtype, device=device) if compute_dw else None
    buffer = torch.empty((min(options.chunk_rows, n), v), dtype=torch.float32, device=device)

    def run(idx: torch.Tensor | None, rows: int, gradient: bool) -> None:
        for start in range(0, rows, options.chunk_rows):
            stop = min(start + options.chunk_rows, rows)
            chunk = torch.arange(start, stop, device=device) if idx is None else idx[start:stop]
            h = hidden[start:stop] if idx is None else hidden.index_select(0, chunk)
            z = buffer[:stop - start]
            chunk_labels = labels[chunk].contiguous()
            matmul_into(z, h, weight.T, accumulate=False)
            lse, label_logit, ent = logits_rows.row_stats(z, chunk_labels, inv_t, options.with_entropy)
            logp = label_logit - lse
            logprobs[chunk] = logp
            if entropy is not None and ent is not None:
                entropy[chunk] = ent
            if not gradient:
                continue
            g_logp, g_ent = token_grad(chunk, logp, ent)
            dz = _dz_view(z, hidden.dtype)
            logits_rows.row_grad(z, chunk_labels, lse, ent if g_ent is not None else None,
                                 g_logp.float().contiguous(), None if g_ent is None else g_ent.float().contiguous(),
                                 inv_t, dz)
            if d_hidden is not None:
                if idx is None:
                    matmul_into(d_hidden[start:stop], dz, weight, accumulate=False)
                else:
                    d_hidden.index_copy_(0, chunk, dz @ weight)
            if d_weight is not None:
                matmul_into(d_weight, dz.T, h, accumulate=True)

    if not with_grad or grad_rows is None:
        run(None, n, with_grad)
    else:
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[grad_rows] = False
        rest = keep.nonzero().squeeze(1)
        run(grad_rows, grad_rows.numel(), True)
        run(rest, rest.numel(), False)
    del buffer
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return ForwardResult(logprobs, entropy, d_hidden, d_weight)


class PrecomputedGradients(torch.autograd.Function):
    """(loss (), hidden, weight, d_hidden, d_weight) -> loss, whose backward scales the precomputed gradients.

    The gradients are handed over once (scaled in place): a second backward through the same graph raises.
    """

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                d_hidden: torch.Tensor | None, d_weight: torch.Tensor | None) -> torch.Tensor:
        ctx.grads = [d_hidden, d_weight]
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("the gradient-in-forward loss hands its precomputed gradients over once; "
                               "call backward on it once (retain_graph double backward is not supported)")
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        scale = grad_loss.to(torch.float32)
        out = [g.mul_(scale.to(g.dtype)) if g is not None else None for g in (d_hidden, d_weight)]
        return None, out[0], out[1], None, None
