"""Backward of causal attention over packed variable-length sequences: Triton kernels and their launcher.

The layout is the forward's (kernels/varlen_attention.py). delta = rowsum(dO * O) first, then two kernels
that recompute the probabilities from the stored logsumexp: dK/dV per key block (looping over the query blocks of
every query head of its group, so the GQA sum stays in registers) and dQ per query block (looping over key blocks).
We take this split over one kernel with atomic dQ: gradients are deterministic (bit-identical reruns matter for RL
debugging) and no fp32 dQ buffer is needed, at the price of computing QK^T and dO V^T twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsrl_fast.kernels.varlen_attention import (
    LOG2E,
    AttentionConfig,
    block_d,
    check_inputs,
    default_config,
    load_tile,
    precision,
)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, T, stride_ot, stride_oh, stride_dot, stride_doh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid, head = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row0 = pid.to(tl.int64) * BLOCK_T
    rel_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (row0 + rel_t[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + row0 * stride_ot + head * stride_oh + rel_t[:, None] * stride_ot + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(do_ptr + row0 * stride_dot + head * stride_doh + rel_t[:, None] * stride_dot + offs_d[None, :],
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head * T + row0 + rel_t, delta, mask=row0 + rel_t < T)


@triton.jit
def _dkdv_steps(dk, dv, k, v, q_seq, do_seq, lse_seq, delta_seq, stride_qt, stride_dot, offs_n, offs_d,
                lo, hi, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contributions of query rows [lo, hi) to dk (unscaled) and dv; MASK applies causality and hi."""
    rel_m = tl.arange(0, BLOCK_M)
    q_offs = rel_m[:, None] * stride_qt + offs_d[None, :]
    do_offs = rel_m[:, None] * stride_dot + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + rel_m
        row_ok = offs_m < hi
        q = load_tile(q_seq + tl.cast(start_m, tl.int64) * stride_qt + q_offs, row_ok, offs_d, HEAD_DIM, BLOCK_D, MASK)
        lse = tl.load(lse_seq + offs_m, mask=row_ok, other=0.0) * LOG2E
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASK:
            p_t = tl.where((offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :], p_t, 0.0)
        do = load_tile(do_seq + tl.cast(start_m, tl.int64) * stride_dot + do_offs, row_ok, offs_d, HEAD_DIM, BLOCK_D,
                        MASK)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(delta_seq + offs_m, mask=row_ok, other=0.0)
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
    pid_n, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    rel_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + rel_n
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    row0 = start + n0
    k = tl.load(k_ptr + row0 * stride_kt + kv_head * stride_kh + rel_n[:, None] * stride_kt + offs_d[None, :],
                mask=tile_ok, other=0.0)
    v = tl.load(v_ptr + row0 * stride_vt + kv_head * stride_vh + rel_n[:, None] * stride_vt + offs_d[None, :],
                mask=tile_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    # Query rows [n0, diag_hi) straddle the diagonal; [diag_hi, full_hi) are whole blocks below it; the rest is the
    # sequence tail. Only the first and last ranges need masks.
    diag_hi = tl.minimum(n0 + BLOCK_N, seqlen)
    full_hi = diag_hi + tl.maximum(seqlen - diag_hi, 0) // BLOCK_M * BLOCK_M
    for g in range(group_size):
        head = kv_head * group_size + g
        q_seq = q_ptr + start * stride_qt + head * stride_qh
        do_seq = do_ptr + start * stride_dot + head * stride_doh
        lse_seq = lse_ptr + head * T + start
        delta_seq = delta_ptr + head * T + start
        dk, dv = _dkdv_steps(dk, dv, k, v, q_seq, do_seq, lse_seq, delta_seq, stride_qt, stride_dot, offs_n,
                             offs_d, n0, diag_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, PRECISION)
        dk, dv = _dkdv_steps(dk, dv, k, v, q_seq, do_seq, lse_seq, delta_seq, stride_qt, stride_dot, offs_n,
                             offs_d, diag_hi, full_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, PRECISION)
        dk, dv = _dkdv_steps(dk, dv, k, v, q_seq, do_seq, lse_seq, delta_seq, stride_qt, stride_dot, offs_n,
                             offs_d, full_hi, seqlen, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, PRECISION)
    tl.store(dk_ptr + row0 * stride_dkt + kv_head * stride_dkh + rel_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptr + row0 * stride_dvt + kv_head * stride_dvh + rel_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, k_seq, v_seq, stride_kt, stride_vt, offs_m, offs_d, lo, hi, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
              PRECISION: tl.constexpr):
    """Add the contributions of key rows [lo, hi) to dq (unscaled)."""
    rel_n = tl.arange(0, BLOCK_N)
    k_offs = rel_n[:, None] * stride_kt + offs_d[None, :]
    v_offs = rel_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + rel_n
        row_ok = offs_n < hi
        k = load_tile(k_seq + tl.cast(start_n, tl.int64) * stride_kt + k_offs, row_ok, offs_d, HEAD_DIM, BLOCK_D,
                       CAUSAL_MASK)
        v = load_tile(v_seq + tl.cast(start_n, tl.int64) * stride_vt + v_offs, row_ok, offs_d, HEAD_DIM, BLOCK_D,
                       CAUSAL_MASK)
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
    do = tl.load(do_ptr + row0 * stride_dot + head * stride_doh + rel_m[:, None] * stride_dot + offs_d[None, :],
                 mask=tile_ok, other=0.0)
    lse = tl.load(lse_ptr + head * T + row0 + rel_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + head * T + row0 + rel_m, mask=row_ok, other=0.0)
    k_seq = k_ptr + start * stride_kt + kv_head * stride_kh
    v_seq = v_ptr + start * stride_vt + kv_head * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    dq = _dq_steps(dq, q, do, lse, delta, k_seq, v_seq, stride_kt, stride_vt, offs_m, offs_d, 0, m0, qk_scale,
                   HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    dq = _dq_steps(dq, q, do, lse, delta, k_seq, v_seq, stride_kt, stride_vt, offs_m, offs_d, m0,
                   tl.minimum(m0 + BLOCK_M, seqlen), qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)
    tl.store(dq_ptr + row0 * stride_dqt + head * stride_dqh + rel_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=tile_ok)


def varlen_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, sm_scale: float,
                         config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' shapes and dtype; dout/out: (T, Hq, D), lse: (Hq, T) fp32."""
    check_inputs(q, k, v, cu_seqlens, max_seqlen)
    assert dout.shape == q.shape == out.shape and dout.dtype == q.dtype and dout.stride(-1) == 1
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
    cfg = config or default_config(q.shape[2], q.dtype, q.device)
    assert cfg.dkdv.block_n % cfg.dkdv.block_m == 0 and cfg.dq.block_m % cfg.dq.block_n == 0
    T, hq, d = q.shape
    hkv = k.shape[1]
    tile_d = block_d(d)
    delta = torch.empty((hq, T), dtype=torch.float32, device=q.device)
    block_t = 64
    _delta_kernel[(triton.cdiv(T, block_t), hq)](out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0),
                                                  dout.stride(1), HEAD_DIM=d, BLOCK_D=tile_d, BLOCK_T=block_t)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    n_seq = cu_seqlens.numel() - 1
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
               dout.stride(1))
    consts = dict(HEAD_DIM=d, BLOCK_D=tile_d, PRECISION=precision(q.dtype))
    c = cfg.dkdv
    _dkdv_kernel[(triton.cdiv(max_seqlen, c.block_n), n_seq, hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, sm_scale, hq // hkv, T, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **consts)
    c = cfg.dq
    _dq_kernel[(triton.cdiv(max_seqlen, c.block_m), n_seq, hq)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, sm_scale, hq // hkv, T, *strides, dq.stride(0), dq.stride(1),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **consts)
    return dq, dk, dv


def compile_specs() -> list[dict[str, object]]:
    """Ahead-of-time compile entries for bench/compile_report.py: each backward kernel × head dim × dtype at its GPU
    default (the entries' keys: see kernels/varlen_attention.py's compile_specs; _delta_kernel has no dot,
    so it never reaches wgmma)."""
    specs: list[dict[str, object]] = []
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    bwd_strides = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_dot",
                   "stride_doh")
    scalars = {"sm_scale": "fp32", "group_size": "i32", "T": "i32"}
    for head_dim in (64, 128):
        for dtype, torch_dtype in torch_dtypes.items():
            cfg = default_config(head_dim, torch_dtype, torch.device("cuda"))
            base = {"variant": f"D{head_dim}", "dtype": dtype}
            dims = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim)}
            gemm = {"PRECISION": precision(torch_dtype)}
            tensor = f"*{dtype}"
            stats = {"lse_ptr": "*fp32", "cu_ptr": "*i32"}
            delta_strides = ("stride_ot", "stride_oh", "stride_dot", "stride_doh")
            # The launcher runs _delta_kernel with BLOCK_T=64 and Triton's default num_warps/num_stages.
            specs.append({
                **base, "kernel": _delta_kernel,
                "signature": {"o_ptr": tensor, "do_ptr": tensor, "delta_ptr": "*fp32", "T": "i32",
                              **{n: "i32" for n in delta_strides}},
                "constexprs": {"BLOCK_T": 64, **dims},
                "aligned": delta_strides, "num_warps": 4, "num_stages": 3, "expect_wgmma": False,
            })
            bwd_inputs = {**{n: tensor for n in ("q_ptr", "k_ptr", "v_ptr", "do_ptr")}, **stats,
                          "delta_ptr": "*fp32"}
            for kernel, cfg_k, grads in ((_dkdv_kernel, cfg.dkdv, ("dk", "dv")), (_dq_kernel, cfg.dq, ("dq",))):
                grad_strides = tuple(f"stride_{g}{axis}" for g in grads for axis in ("t", "h"))
                specs.append({
                    **base, "kernel": kernel,
                    "signature": {**bwd_inputs, **{f"{g}_ptr": tensor for g in grads}, **scalars,
                                  **{n: "i32" for n in bwd_strides + grad_strides}},
                    "constexprs": {"BLOCK_M": cfg_k.block_m, "BLOCK_N": cfg_k.block_n, **dims, **gemm},
                    "aligned": bwd_strides + grad_strides, "num_warps": cfg_k.num_warps,
                    "num_stages": cfg_k.num_stages, "expect_wgmma": dtype != "fp32",
                })
    return specs
