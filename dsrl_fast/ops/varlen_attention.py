"""Causal attention over packed variable-length sequences: the autograd function over the Triton kernels and the
flash-attn and PyTorch backends (the hook into transformers models is dsrl_fast/model/attention.py).

Packed layout (flash-attn's varlen contract): S sequences concatenated along T tokens, `cu_seqlens` (S+1,) int32
holds their cumulative lengths starting at 0. Every token attends causally within its own sequence only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from dsrl_fast.ops.validation import check_same_device, check_tensor, resolve_impl

BACKENDS = ("auto", "triton", "flash_attn", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class _Options:
    max_seqlen: int
    softmax_scale: float


class _TritonVarlenAttention(torch.autograd.Function):
    """(q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D), cu_seqlens (S+1,) int32) -> out (T, Hq, D)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                options: _Options) -> torch.Tensor:
        from dsrl_fast.kernels.varlen_attention import varlen_attention_fwd

        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens, options.max_seqlen, options.softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from dsrl_fast.kernels.varlen_attention_bwd import varlen_attention_bwd

        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        options: _Options = ctx.options
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, options.max_seqlen,
                                          options.softmax_scale)
        return dq, dk, dv, None, None


def _torch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            softmax_scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(group, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _flash_attn_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                 max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "backend='flash_attn' needs the flash-attn package (pip install flash-attn, CUDA build); "
            "backend='triton' needs no extra package"
        ) from err
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0,
                                  softmax_scale=softmax_scale, causal=True)


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    lens = cu_seqlens.diff()
    first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lens.min(), lens.max()]).tolist()
    if first != 0 or shortest < 0:
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu_seqlens.tolist()}")
    if last != total:
        raise ValueError(f"cu_seqlens[-1] must equal the token count q.shape[0]={total}, got {last}")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen must be >= the longest sequence ({longest}), got {max_seqlen}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    return resolve_impl(backend, device, name="backend", choices=BACKENDS)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, softmax_scale: float | None = None, backend: str = "auto",
                     check_cu_seqlens: bool = True) -> torch.Tensor:
    """Causal attention within each packed sequence; differentiable in q, k and v.

    q: (T, Hq, D), k/v: (T, Hkv, D) fp16/bf16/fp32 (fp64 on backend "torch"), Hq a multiple of Hkv, head dim
    contiguous (other strides free). cu_seqlens: (S+1,) int32, max_seqlen: int >= the longest sequence.
    softmax_scale: defaults to 1/sqrt(D). backend: "triton" (Triton kernels; CUDA, or CPU under
    TRITON_INTERPRET=1), "flash_attn" (flash_attn_varlen_func), "torch" (per-sequence SDPA, one host sync),
    "auto" (triton on CUDA, torch otherwise). check_cu_seqlens: verify the cu_seqlens values (one host sync).
    Returns (T, Hq, D) in q's dtype.
    """
    check_tensor("q", q, ndim=3, dtypes=_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,))
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,))
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    check_same_device("q", q, k=k, v=v, cu_seqlens=cu_seqlens)
    total, hq, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"k must have shape ({total}, Hkv, {head_dim}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"q's head count must be a multiple of k's, got Hq={hq} and Hkv={k.shape[1]}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 entries (S+1 with S >= 1), got {cu_seqlens.numel()}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0 or None, got {softmax_scale!r}")
    resolved = _resolve_backend(backend, q.device)
    if resolved != "torch" and q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"q must be fp16/bf16/fp32 for backend {resolved!r}, got {q.dtype}")
    if resolved == "triton" and head_dim > 256:
        raise ValueError(f"head dim must be <= 256 for backend 'triton', got {head_dim}")
    if resolved == "triton" and max(cu_seqlens.numel() - 1, hq) > 65535:
        raise ValueError(f"backend 'triton' takes at most 65535 sequences and heads, got S={cu_seqlens.numel() - 1} "
                         f"and Hq={hq}")
    if check_cu_seqlens:
        _check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    if resolved == "torch":
        return _torch_varlen_attention(q, k, v, cu_seqlens, softmax_scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if resolved == "flash_attn":
        return _flash_attn_varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    return _TritonVarlenAttention.apply(q, k, v, cu_seqlens, _Options(max_seqlen, float(softmax_scale)))


def packed_metadata_from_position_ids(position_ids: torch.Tensor, batch: int,
                                      seq_len: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens (S+1,) int32 and max_seqlen for `batch` rows of `seq_len` tokens flattened row-major.

    A sequence starts at every row start and wherever position_ids is 0. position_ids: (1 or batch, seq_len).
    One host sync.
    """
    if position_ids.dim() != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape ({batch} or 1, {seq_len}), got {tuple(position_ids.shape)}")
    starts = position_ids.expand(batch, seq_len) == 0
    starts[:, 0] = True
    idx = starts.reshape(-1).nonzero().flatten()
    end = torch.tensor([batch * seq_len], device=idx.device, dtype=idx.dtype)
    cu_seqlens = torch.cat([idx, end]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())
