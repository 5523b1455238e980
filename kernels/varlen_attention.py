"""Causal attention over packed variable-length sequences (FlashAttention-2 style), Triton kernels and launchers.

Layout (the flash-attn varlen contract): S sequences packed along T tokens, delimited by `cu_seqlens` (S+1,) int32;
q (T, Hq, D), k and v (T, Hkv, D) with Hq a multiple of Hkv (query head h reads key/value head h // (Hq / Hkv)).
Attention is causal inside each sequence and never crosses a sequence boundary.

Forward: grid (query blocks of the longest sequence, S, Hq); each program streams the key blocks of its own
sequence with an online softmax in fp32 and stores the output and the row logsumexp (natural log, (Hq, T) fp32).
Key blocks strictly below the diagonal run without masks; only the diagonal blocks pay for them.

The backward kernels are in kernels/varlen_attention_bwd.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


class KernelConfig(NamedTuple):
    """Tile and launch options of one kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


class AttentionConfig(NamedTuple):
    """Per-kernel configs. fwd and dq iterate key tiles inside a query tile (block_m % block_n == 0); dkdv
    iterates query tiles inside a key tile (block_n % block_m == 0)."""

    fwd: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig


# Tiles that compile without register spills for sm_90a in ptxas (bf16/fp16, Triton 3.7); wider heads need
# smaller tiles. The interpreter runs Python per tile op: its tiles are small only so that short test sequences
# cross several tiles.
_GPU_CONFIGS = {
    64: AttentionConfig(fwd=KernelConfig(128, 64, 8, 3), dkdv=KernelConfig(32, 128, 8, 2),
                        dq=KernelConfig(128, 64, 8, 2)),
    128: AttentionConfig(fwd=KernelConfig(128, 32, 8, 2), dkdv=KernelConfig(16, 64, 8, 2),
                         dq=KernelConfig(128, 32, 8, 2)),
    256: AttentionConfig(fwd=KernelConfig(32, 32, 8, 2), dkdv=KernelConfig(16, 32, 8, 2),
                         dq=KernelConfig(32, 32, 8, 2)),
}
# fp32 runs without tensor cores (exact fp32 products), so it is the debugging path: small tiles over 8 warps keep
# every head dim up to 256 free of spills for sm_90a (4 warps, or 32-row key tiles in fwd/dq, spill at D=128).
_FP32_CONFIG = AttentionConfig(fwd=KernelConfig(32, 16, 8, 1), dkdv=KernelConfig(16, 32, 8, 1),
                               dq=KernelConfig(32, 16, 8, 1))
INTERPRETER_CONFIG = AttentionConfig(fwd=KernelConfig(32, 16, 1, 1), dkdv=KernelConfig(16, 32, 1, 1),
                                     dq=KernelConfig(32, 16, 1, 1))


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    """The vetted config for heads of `head_dim` in `dtype` on `device` (CPU means the Triton interpreter)."""
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return _FP32_CONFIG
    return _GPU_CONFIGS[min(c for c in _GPU_CONFIGS if c >= head_dim)]


@triton.jit
def load_tile(ptrs, row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what can be out of bounds (mask tiles cost registers)."""
    if HEAD_DIM == BLOCK_D:
        if CHECK_ROWS:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _fwd_steps(acc, m_i, l_i, q, k_seq, v_seq, stride_kt, stride_vt, offs_m, offs_d, lo, hi, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over key rows [lo, hi); CAUSAL_MASK also checks rows < hi."""
    rel_n = tl.arange(0, BLOCK_N)
    # 32-bit offsets inside a tile on top of a 64-bit scalar base: int64 offset tiles cost registers and spill.
    k_offs = rel_n[:, None] * stride_kt + offs_d[None, :]
    v_offs = rel_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + rel_n
        row_ok = offs_n < hi
        k = load_tile(k_seq + tl.cast(start_n, tl.int64) * stride_kt + k_offs, row_ok, offs_d, HEAD_DIM, BLOCK_D,
                       CAUSAL_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_seq + tl.cast(start_n, tl.int64) * stride_vt + v_offs, row_ok, offs_d, HEAD_DIM, BLOCK_D,
                       CAUSAL_MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, sm_scale, group_size, T,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kv_head = head // group_size
    rel_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + rel_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    row0 = start + m0
    q = tl.load(q_ptr + row0 * stride_qt + head * stride_qh + rel_m[:, None] * stride_qt + offs_d[None, :],
                mask=tile_ok, other=0.0)
    k_seq = k_ptr + start * stride_kt + kv_head * stride_kh
    v_seq = v_ptr + start * stride_vt + kv_head * stride_vh
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_seq, v_seq, stride_kt, stride_vt, offs_m, offs_d, 0, m0,
                               qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_seq, v_seq, stride_kt, stride_vt, offs_m, offs_d, m0,
                               tl.minimum(m0 + BLOCK_M, seqlen), qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(o_ptr + row0 * stride_ot + head * stride_oh + rel_m[:, None] * stride_ot + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(lse_ptr + head * T + row0 + rel_m, (m_i + tl.log2(l_i)) / LOG2E, mask=row_ok)


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 semantics (no silent TF32); 16-bit operands use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    assert q.dim() == 3 and k.dim() == 3 and k.shape == v.shape
    assert q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[1] % k.shape[1] == 0
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and 2 <= cu_seqlens.numel() <= 65536
    assert q.shape[1] <= 65535  # grid axes 1 and 2 hold sequences and heads
    assert q.shape[2] <= 256 and max_seqlen >= 1
    assert max(t.stride(0) for t in (q, k, v)) < 2**31 // 256  # in-tile offsets are 32-bit


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, sm_scale: float,
                         config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, D), k/v: (T, Hkv, D) fp16/bf16/fp32, cu_seqlens: (S+1,) int32, max_seqlen: int.

    Returns out (T, Hq, D) in q's dtype and lse (Hq, T) fp32 (natural-log row logsumexp).
    """
    check_inputs(q, k, v, cu_seqlens, max_seqlen)
    cfg = (config or default_config(q.shape[2], q.dtype, q.device)).fwd
    assert cfg.block_m % cfg.block_n == 0
    T, hq, d = q.shape
    out = torch.empty((T, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, T), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(max_seqlen, cfg.block_m), cu_seqlens.numel() - 1, hq)
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens, sm_scale, hq // k.shape[1], T,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1),
                      HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      PRECISION=precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def compile_specs() -> list[dict[str, object]]:
    """Ahead-of-time compile entries for bench/compile_report.py: each kernel × head dim × dtype at its GPU default.

    Each entry: kernel (the @triton.jit function), variant ("D<head_dim>"), dtype ("bf16" | "fp16" | "fp32"),
    signature ({runtime argument: Triton type}), constexprs, aligned (the row and head strides, multiples of 16 for
    contiguous (T, H, D) tensors with D a multiple of 16), num_warps, num_stages, expect_wgmma (16-bit GEMM kernels
    must reach Hopper's wgmma; fp32 runs exact fp32 products).
    """
    specs: list[dict[str, object]] = []
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    fwd_strides = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot",
                   "stride_oh")
    scalars = {"sm_scale": "fp32", "group_size": "i32", "T": "i32"}
    for head_dim in (64, 128):
        for dtype, torch_dtype in torch_dtypes.items():
            cfg = default_config(head_dim, torch_dtype, torch.device("cuda"))
            base = {"variant": f"D{head_dim}", "dtype": dtype}
            dims = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim)}
            gemm = {"PRECISION": precision(torch_dtype)}
            tensor = f"*{dtype}"
            stats = {"lse_ptr": "*fp32", "cu_ptr": "*i32"}
            specs.append({
                **base, "kernel": _fwd_kernel,
                "signature": {**{n: tensor for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}, **stats, **scalars,
                              **{n: "i32" for n in fwd_strides}},
                "constexprs": {"BLOCK_M": cfg.fwd.block_m, "BLOCK_N": cfg.fwd.block_n, **dims, **gemm},
                "aligned": fwd_strides, "num_warps": cfg.fwd.num_warps, "num_stages": cfg.fwd.num_stages,
                "expect_wgmma": dtype != "fp32",
            })
    return specs
