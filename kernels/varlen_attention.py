"""Causal attention over packed variable-length sequences (FlashAttention-2 style), Triton kernels and launchers.

Layout (the flash-attn varlen contract): S sequences packed along T tokens, delimited by `cu_seqlens` (S+1,) int32;
q (T, Hq, D), k and v (T, Hkv, D) with Hq a multiple of Hkv (query head h reads key/value head h // (Hq / Hkv)).
Attention is causal inside each sequence and never crosses a sequence boundary.

Forward: grid (query blocks of the longest sequence, S, Hq); each program streams the key blocks of its own
sequence with an online softmax in fp32 and stores the output and the row logsumexp (natural log, (Hq, T) fp32).
Key blocks strictly below the diagonal run without masks; only the diagonal blocks pay for them.

Backward: delta = rowsum(dO * O) first, then two kernels that recompute the probabilities from the stored
logsumexp: dK/dV per key block (looping over the query blocks of every query head of its group, so the GQA sum
stays in registers) and dQ per query block (looping over key blocks). We take this split over one kernel with
atomic dQ: gradients are deterministic (bit-identical reruns matter for RL debugging) and no fp32 dQ buffer is
needed, at the price of computing QK^T and dO V^T twice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


class AttentionConfig(NamedTuple):
    """Tile sizes and launch options. block_m % block_n == 0 and bwd_block_n % bwd_block_m == 0."""

    block_m: int  # query rows per forward / dQ program
    block_n: int  # key rows per forward / dQ step
    bwd_block_m: int  # query rows per dK/dV step
    bwd_block_n: int  # key rows per dK/dV program
    num_warps: int
    num_stages: int


# Defaults after the Triton fused-attention tutorial's Hopper/Ampere tiles, smaller for wide heads to fit shared
# memory. The interpreter runs Python per block op; its tiles are small enough that test shapes cross blocks.
_GPU_CONFIGS = {
    64: AttentionConfig(block_m=128, block_n=64, bwd_block_m=32, bwd_block_n=128, num_warps=4, num_stages=3),
    128: AttentionConfig(block_m=128, block_n=64, bwd_block_m=32, bwd_block_n=64, num_warps=8, num_stages=2),
    256: AttentionConfig(block_m=64, block_n=32, bwd_block_m=16, bwd_block_n=64, num_warps=8, num_stages=1),
}
INTERPRETER_CONFIG = AttentionConfig(block_m=32, block_n=16, bwd_block_m=16, bwd_block_n=32, num_warps=1, num_stages=1)


def default_config(head_dim: int, device: torch.device) -> AttentionConfig:
    """The vetted config for heads of `head_dim` on `device` (CPU means the Triton interpreter)."""
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    return _GPU_CONFIGS[min(c for c in _GPU_CONFIGS if c >= head_dim)]


@triton.jit
def _fwd_steps(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over key rows [lo, hi); scores kept in log2 units."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < hi) & d_ok
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, sm_scale, group_size, T,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kv_head = head // group_size
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + (start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                mask=tile_ok, other=0.0)
    k_base = k_ptr + start * stride_kt + kv_head * stride_kh
    v_base = v_ptr + start * stride_vt + kv_head * stride_vh
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, m0,
                               qk_scale, HEAD_DIM, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, m0,
                               tl.minimum(m0 + BLOCK_M, seqlen), qk_scale, HEAD_DIM, BLOCK_N, True, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(o_ptr + (start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(lse_ptr + head.to(tl.int64) * T + start + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=row_ok)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, T, stride_ot, stride_oh, stride_dot, stride_doh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid, head = tl.program_id(0), tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_t[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(o_ptr + rows * stride_ot + head * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptr + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head.to(tl.int64) * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                lo, hi, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                PRECISION: tl.constexpr):
    """Add the contributions of query rows [lo, hi) to dk (unscaled) and dv; MASK applies causality and hi."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < hi
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * LOG2E
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASK:
            p_t = tl.where((offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :], p_t, 0.0)
        do = tl.load(do_base + rows * stride_dot + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, sm_scale, group_size, T,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid_n, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    rows = start + offs_n[:, None]
    k = tl.load(k_ptr + rows * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=tile_ok, other=0.0)
    v = tl.load(v_ptr + rows * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=tile_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    # Query rows [n0, diag_hi) straddle the diagonal; [diag_hi, full_hi) are whole blocks below it; the rest is the
    # sequence tail. Only the first and last ranges need masks.
    diag_hi = tl.minimum(n0 + BLOCK_N, seqlen)
    full_hi = diag_hi + tl.maximum(seqlen - diag_hi, 0) // BLOCK_M * BLOCK_M
    for g in range(group_size):
        head = kv_head * group_size + g
        q_base = q_ptr + start * stride_qt + head * stride_qh
        do_base = do_ptr + start * stride_dot + head * stride_doh
        lse_base = lse_ptr + head.to(tl.int64) * T + start
        delta_base = delta_ptr + head.to(tl.int64) * T + start
        dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                             offs_d, n0, diag_hi, qk_scale, HEAD_DIM, BLOCK_M, True, PRECISION)
        dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                             offs_d, diag_hi, full_hi, qk_scale, HEAD_DIM, BLOCK_M, False, PRECISION)
        dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                             offs_d, full_hi, seqlen, qk_scale, HEAD_DIM, BLOCK_M, True, PRECISION)
    tl.store(dk_ptr + rows * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptr + rows * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contributions of key rows [lo, hi) to dq (unscaled)."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < hi) & d_ok
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, sm_scale, group_size, T,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_dqt, stride_dqh,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kv_head = head // group_size
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = start + offs_m[:, None]
    q = tl.load(q_ptr + rows * stride_qt + head * stride_qh + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(do_ptr + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=tile_ok, other=0.0)
    lse = tl.load(lse_ptr + head.to(tl.int64) * T + start + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + head.to(tl.int64) * T + start + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + start * stride_kt + kv_head * stride_kh
    v_base = v_ptr + start * stride_vt + kv_head * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, m0, qk_scale,
                   HEAD_DIM, BLOCK_N, False, PRECISION)
    dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, m0,
                   tl.minimum(m0 + BLOCK_M, seqlen), qk_scale, HEAD_DIM, BLOCK_N, True, PRECISION)
    tl.store(dq_ptr + rows * stride_dqt + head * stride_dqh + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=tile_ok)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 semantics (no silent TF32); 16-bit operands use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    assert q.dim() == 3 and k.dim() == 3 and k.shape == v.shape
    assert q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[1] % k.shape[1] == 0
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
    assert q.shape[2] <= 256 and max_seqlen >= 1


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, sm_scale: float,
                         config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, D), k/v: (T, Hkv, D) fp16/bf16/fp32, cu_seqlens: (S+1,) int32, max_seqlen: int.

    Returns out (T, Hq, D) in q's dtype and lse (Hq, T) fp32 (natural-log row logsumexp).
    """
    _check(q, k, v, cu_seqlens, max_seqlen)
    cfg = config or default_config(q.shape[2], q.device)
    assert cfg.block_m % cfg.block_n == 0
    T, hq, d = q.shape
    out = torch.empty((T, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, T), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(max_seqlen, cfg.block_m), cu_seqlens.numel() - 1, hq)
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens, sm_scale, hq // k.shape[1], T,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1),
                      HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      PRECISION=_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def varlen_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, sm_scale: float,
                         config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' shapes and dtype; dout/out: (T, Hq, D), lse: (Hq, T) fp32."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    assert dout.shape == q.shape == out.shape and dout.dtype == q.dtype and dout.stride(-1) == 1
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
    cfg = config or default_config(q.shape[2], q.device)
    assert cfg.bwd_block_n % cfg.bwd_block_m == 0
    T, hq, d = q.shape
    hkv = k.shape[1]
    block_d = _block_d(d)
    delta = torch.empty((hq, T), dtype=torch.float32, device=q.device)
    block_t = 64
    _delta_kernel[(triton.cdiv(T, block_t), hq)](out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0),
                                                  dout.stride(1), HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    n_seq = cu_seqlens.numel() - 1
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, PRECISION=_precision(q.dtype), num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    _dkdv_kernel[(triton.cdiv(max_seqlen, cfg.bwd_block_n), n_seq, hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, sm_scale, hq // hkv, T,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.bwd_block_n, **common)
    _dq_kernel[(triton.cdiv(max_seqlen, cfg.block_m), n_seq, hq)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, sm_scale, hq // hkv, T,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common)
    return dq, dk, dv
