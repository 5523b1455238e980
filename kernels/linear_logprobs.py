"""Token log-probs and entropy straight from hidden states and the LM-head weight, never storing all logits.

Work and bound (N tokens, N_a of them with a nonzero gradient, hidden H, vocabulary V, 16-bit operands; H100 SXM
and H200 both 989 TFLOP/s dense bf16 on 132 SMs, HBM 3.35 / 4.8 TB/s; bench/roofline.py gives every figure below
per shape and GPU):

- Forward (`_forward_kernel`): one logits GEMM, 2·N·H·V FLOPs on wgmma with an online logsumexp/entropy epilogue;
  it writes 3 fp32 statistics per (row, vocabulary split), the logsumexp of every (row, vocabulary tile) when
  tile skipping is on (N·V/BLOCK_V·4 bytes, reduced to fp16 masses after the forward), and nothing per logit. Tiles arrive by TMA tensor
  descriptors where the strides allow (no per-element addresses: 128×128 tiles then take ~130 registers, so two
  programs share an SM and one's softmax epilogue overlaps the other's MMA); the label's logit comes from a small
  gather-dot kernel (`_label_logit_kernel`, N·H work) rather than the GEMM epilogue (~70 registers less). The
  number of vocabulary splits is chosen so the grid fills whole waves of resident programs (no tail wave). Its time
  is the MMA at the Triton kernel's rate, plus the epilogue where it is not overlapped, times the wave efficiency.
- Backward, per vocabulary slice of width S (`_dlogits_kernel` + two GEMMs): the kernel recomputes the logits tile
  of the slice (2·N_a·H·S), applies the softmax/entropy gradient epilogue and writes the slice of dz (N_a, S) in
  the input dtype; cuBLAS then accumulates d_hidden += dz·W_slice into an fp32 (N_a, H) buffer (2·N_a·H·S) and
  writes d_weight[slice] = dzᵀ·h once (2·N_a·H·S). Dense work is 8·N_a·H·V in total, every FLOP on tensor cores,
  and every reduction is inside a GEMM's K loop or grid-ordered: no atomics, bitwise-identical runs. Rows with
  zero gradient are compacted away first. S comes from `slice_width`: the d_hidden GEMM moves (N_a·S·2 + S·H·2 +
  N_a·H·8) bytes per 2·N_a·H·S FLOPs, about S/4 FLOP/B, so S must stay above ~4× the ridge point (H100: 989 / 3.35
  ≈ 295 FLOP/B) to keep it compute-bound, and the d_weight GEMM's ⌈S/128⌉·⌈H/256⌉ output tiles should fill whole
  waves of 132 SMs. The workspace is the dz slice, N_a·S·2 bytes, plus the fp32 accumulator, N_a·H·4 bytes.
- Vocabulary-tile skipping (dsrl_fast/ops/tile_skip.py, kernels/sparse_grads.py): tiles of (BLOCK_N rows ×
  BLOCK_V columns) whose softmax is below a threshold for every row are left out of all three backward GEMMs.
- The ceiling of a path that keeps no logits is 6/8 = 75% of the 6·N·H·V cuBLAS rate if every GEMM ran at the
  cuBLAS rate. With the Triton kernels at ~60% of peak against cuBLAS's ~75%, their epilogues and waves, the model
  predicts 60-63% at Qwen3-4B/8B, N = 8k/16k, on H100 and H200 alike (the path is compute-bound); skipping tiles
  scales the backward's dense work by the kept share k, which beats the dense backward below k ≈ 0.75 and Liger's
  SM90 backward (4·N·H·V at its reported 657 TFLOP/s) below k ≈ 0.5 (bench/roofline.py; predictions until
  bench/gpu_run.py has measured them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dsrl_fast.kernels.fused_tiles import (
    DLOGITS_CONFIG,
    FORWARD_CONFIG,
    FP32_DLOGITS_CONFIG,
    FP32_FORWARD_CONFIG,
    GROUP_ROWS,
    INTERPRETER_CONFIG,
    LABEL_BLOCK_H,
    LABEL_BLOCK_N,
    SLICE_MULTIPLE,
    KernelConfig,
    default_config,
    gpu_config,
    max_registers,
    num_splits,
    slice_width,
    tma_ok,
)

__all__ = [
    "DLOGITS_CONFIG", "FORWARD_CONFIG", "FP32_DLOGITS_CONFIG", "FP32_FORWARD_CONFIG", "INTERPRETER_CONFIG",
    "SLICE_MULTIPLE", "KernelConfig", "Partials", "combine_partials", "compile_specs", "default_config", "dlogits",
    "forward_partials", "gpu_config", "num_splits", "slice_width", "tma_ok",
]


class Partials(NamedTuple):
    """Per-split statistics of the forward pass, each (splits, N) fp32; label_logit is (1, N)."""

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_z: torch.Tensor
    label_logit: torch.Tensor


@triton.jit
def _grouped_tile(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """(row block, column block) of program `pid`: GROUP row blocks sweep the columns together (L2 reuse)."""
    per_group = GROUP * n_col_blocks
    first_row_block = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP)
    local = pid % per_group
    return first_row_block + local % group_rows, local // group_rows


@triton.jit
def _logits_tile(h, w, row0, v0, N, v_end, H, stride_hn, stride_wv, inv_temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, USE_TMA: tl.constexpr,
                 PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of hidden[row0:] @ weight[v0:].T / temperature; columns at or past v_end get
    -3e38 (finite: exp gives 0 and p·z stays 0). h, w: TMA descriptors (USE_TMA) or pointers."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    col_ok = offs_v < v_end
    if USE_TMA:
        for h0 in range(0, H, BLOCK_H):
            acc = tl.dot(h.load([row0, h0]), tl.trans(w.load([v0, h0])), acc, input_precision=PRECISION)
    else:
        offs_n = row0 + tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, BLOCK_H)
        row_ok = offs_n < N
        for h0 in range(0, H, BLOCK_H):
            h_ok = (h0 + offs_h) < H
            a = tl.load(h + offs_n[:, None].to(tl.int64) * stride_hn + (h0 + offs_h)[None, :],
                        mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            b = tl.load(w + offs_v[:, None].to(tl.int64) * stride_wv + (h0 + offs_h)[None, :],
                        mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return tl.where(col_ok[None, :], acc * inv_temperature, -3.0e38)


@triton.jit
def _forward_kernel(h, w, max_ptr, sum_ptr, sumz_ptr, tile_lse_ptr, N, V, H, stride_hn, stride_wv, inv_temperature,
                    tiles_per_split, num_splits, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, GROUP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                    WITH_TILE_LSE: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP)
    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    run_max = tl.full((BLOCK_N,), -3.0e38, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sumz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_tile = split.to(tl.int64) * tiles_per_split
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        z = _logits_tile(h, w, row0, v0, N, v_end, H, stride_hn, stride_wv, inv_temperature,
                         BLOCK_N, BLOCK_V, BLOCK_H, USE_TMA, PRECISION)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        tile_sum = tl.sum(p, axis=1)
        if WITH_TILE_LSE:
            tile = first_tile + (v0 - v_begin) // BLOCK_V
            tl.store(tile_lse_ptr + tile * N + offs_n, new_max + tl.log(tile_sum), mask=row_ok)
        run_sum = run_sum * rescale + tile_sum
        if WITH_ENTROPY:
            run_sumz = run_sumz * rescale + tl.sum(p * z, axis=1)
        run_max = new_max
    out = split.to(tl.int64) * N + offs_n
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)
    tl.store(sumz_ptr + out, run_sumz, mask=row_ok)


@triton.jit
def _label_logit_kernel(h_ptr, w_ptr, labels_ptr, out_ptr, N, H, stride_hn, stride_wv, inv_temperature,
                        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = hidden[r] · weight[labels[r]] / temperature in fp32 (products of 16-bit values are exact in fp32)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=0)
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ok = row_ok[:, None] & ((h0 + offs_h) < H)[None, :]
        a = tl.load(h_ptr + offs_n[:, None].to(tl.int64) * stride_hn + (h0 + offs_h)[None, :], mask=ok, other=0.0)
        b = tl.load(w_ptr + labels[:, None] * stride_wv + (h0 + offs_h)[None, :], mask=ok, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + offs_n, acc * inv_temperature, mask=row_ok)


@triton.jit
def _dlogits_kernel(h, w, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dz_ptr, pairs_ptr,
                    N, V, H, v_begin, slice_width, stride_hn, stride_wv, stride_dzn, inv_temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                    HAS_ENT_GRAD: tl.constexpr, SPARSE: tl.constexpr, USE_TMA: tl.constexpr,
                    PRECISION: tl.constexpr):
    """dz = d loss / d z of one (row block, vocabulary tile).

    Dense: the tiles of the slice [v_begin, v_begin + slice_width), dz[:, c] at column c - v_begin of a (N,
    slice_width) buffer. SPARSE: program p takes the pair (row block, vocabulary tile) = pairs[p] and writes a full
    (BLOCK_N, BLOCK_V) tile at dz + p·BLOCK_N·BLOCK_V (zeros outside the rows and vocabulary).
    """
    pid = tl.program_id(0)
    if SPARSE:
        pid_n = tl.load(pairs_ptr + 2 * pid)
        v0 = tl.load(pairs_ptr + 2 * pid + 1) * BLOCK_V
        v_end = V
    else:
        pid_n, pid_c = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(slice_width, BLOCK_V), GROUP)
        v0 = v_begin + pid_c * BLOCK_V
        v_end = tl.minimum(v_begin + slice_width, V)
    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    col_ok = offs_v < v_end

    z = _logits_tile(h, w, row0, v0, N, v_end, H, stride_hn, stride_wv, inv_temperature,
                     BLOCK_N, BLOCK_V, BLOCK_H, USE_TMA, PRECISION)
    g_logp = tl.load(g_logp_ptr + offs_n, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=-1)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    # d logp_label / dz = onehot - p ; d entropy / dz = -p · (log p + entropy)
    dz = g_logp[:, None] * (tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        g_ent = tl.load(g_ent_ptr + offs_n, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + offs_n, mask=row_ok, other=0.0)
        dz -= g_ent[:, None] * p * (tl.where(p > 0, log_p, 0.0) + entropy[:, None])
    mask = row_ok[:, None] & col_ok[None, :]
    dz = tl.where(mask, dz * inv_temperature, 0.0).to(dz_ptr.dtype.element_ty)
    if SPARSE:
        tile = dz_ptr + pid.to(tl.int64) * (BLOCK_N * BLOCK_V)
        tl.store(tile + tl.arange(0, BLOCK_N)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :], dz)
    else:
        tl.store(dz_ptr + offs_n[:, None].to(tl.int64) * stride_dzn + (offs_v - v_begin)[None, :], dz, mask=mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 semantics (no silent TF32); 16-bit operands use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _operands(hidden: torch.Tensor, weight: torch.Tensor, cfg: KernelConfig) -> tuple[object, object, bool]:
    """(h, w, use_tma): TMA descriptors over hidden/weight with the config's tiles where allowed, else the tensors."""
    if not tma_ok(hidden, weight):
        return hidden, weight, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor.from_tensor(hidden, [cfg.block_n, cfg.block_h]),
            TensorDescriptor.from_tensor(weight, [cfg.block_v, cfg.block_h]), True)


def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def forward_partials(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
                     with_entropy: bool, config: KernelConfig | None = None, splits: int | None = None,
                     tile_lse: torch.Tensor | None = None) -> Partials:
    """Launch the forward kernels.

    hidden: (N, H) fp32/fp16/bf16, unit stride on H; weight: (V, H) same dtype; labels: (N,) int64 in [0, V).
    tile_lse: None, or a (⌈V / block_v⌉, N) fp32 buffer that receives the logsumexp of z = logits / temperature
    over every (vocabulary tile, row) (block_v of the config). Returns Partials of (splits, N) fp32 tensors (the
    label logit (1, N)), merged by `combine_partials`.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    assert hidden.stride(1) == 1 and weight.stride(1) == 1 and labels.is_contiguous()
    assert weight.dtype == hidden.dtype and n > 0
    cfg = config or default_config("forward", hidden)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    n_vocab_tiles = triton.cdiv(v, cfg.block_v)
    assert tile_lse is None or (tile_lse.shape == (n_vocab_tiles, n) and tile_lse.is_contiguous())
    if splits is None:
        splits = num_splits(n_row_blocks, n_vocab_tiles, _device_sms(hidden.device), cfg.resident_per_sm)
        splits = min(splits, 2) if hidden.device.type != "cuda" else splits
    tiles_per_split = triton.cdiv(n_vocab_tiles, splits)
    splits = triton.cdiv(n_vocab_tiles, tiles_per_split)
    stats = torch.empty((3, splits, n), dtype=torch.float32, device=hidden.device)
    label_logit = torch.empty((1, n), dtype=torch.float32, device=hidden.device)
    h, w, use_tma = _operands(hidden, weight, cfg)
    _forward_kernel[(n_row_blocks * splits,)](
        h, w, stats[0], stats[1], stats[2], tile_lse if tile_lse is not None else stats[0],
        n, v, h_dim, hidden.stride(0), weight.stride(0), inv_temperature, tiles_per_split, splits,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=GROUP_ROWS, WITH_ENTROPY=with_entropy,
        WITH_TILE_LSE=tile_lse is not None, USE_TMA=use_tma, PRECISION=_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=max_registers(cfg),
    )
    _label_logit_kernel[(triton.cdiv(n, LABEL_BLOCK_N),)](
        hidden, weight, labels, label_logit, n, h_dim, hidden.stride(0), weight.stride(0), inv_temperature,
        BLOCK_N=LABEL_BLOCK_N, BLOCK_H=LABEL_BLOCK_H, num_warps=4)
    return Partials(stats[0], stats[1], stats[2], label_logit)


def combine_partials(partials: Partials) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge split statistics into (lse, label_logit, entropy), each (N,) fp32 (entropy = lse - E_p[z])."""
    row_max = partials.row_max.amax(dim=0)
    scale = torch.exp(partials.row_max - row_max)
    total = (partials.sum_exp * scale).sum(dim=0)
    lse = row_max + torch.log(total)
    mean_z = (partials.sum_exp_z * scale).sum(dim=0) / total
    return lse, partials.label_logit.sum(dim=0), lse - mean_z


def dlogits(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
            entropy: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
            inv_temperature: float, out: torch.Tensor, *, v_begin: int = 0, pairs: torch.Tensor | None = None,
            config: KernelConfig | None = None) -> None:
    """Launch the dz kernel over the rows `hidden` (N, H) and weight (V, H) of one dtype.

    labels, lse, grad_logprobs (and entropy, grad_entropy when the entropy has a gradient): (N,) contiguous, fp32
    except labels (int64). Dense (pairs None): out (N, S) in hidden's dtype, unit column stride, receives d loss /
    d logits of the columns [v_begin, v_begin + S). Sparse: pairs (P, 2) int32 (row block, vocabulary tile) of the
    config's tiles; out (P, block_n, block_v) contiguous receives one full tile per pair.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    cfg = config or default_config("dlogits", hidden)
    assert out.dtype == hidden.dtype and grad_logprobs.dtype == torch.float32
    assert grad_logprobs.is_contiguous() and lse.is_contiguous() and (entropy is None) == (grad_entropy is None)
    if pairs is None:
        width = out.shape[1]
        assert out.shape[0] == n and out.stride(1) == 1 and 0 <= v_begin < v and v_begin + width <= v
        grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(width, cfg.block_v),)
    else:
        width = 0
        assert pairs.dtype == torch.int32 and pairs.is_contiguous() and out.is_contiguous()
        assert out.shape == (pairs.shape[0], cfg.block_n, cfg.block_v)
        grid = (pairs.shape[0],)
    if grid[0] == 0:
        return
    has_ent = grad_entropy is not None
    h, w, use_tma = _operands(hidden, weight, cfg)
    _dlogits_kernel[grid](
        h, w, labels, lse, entropy if has_ent else lse, grad_logprobs, grad_entropy if has_ent else grad_logprobs,
        out, pairs if pairs is not None else labels, n, v, h_dim, v_begin, width, hidden.stride(0),
        weight.stride(0), out.stride(0) if pairs is None else cfg.block_v, inv_temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=GROUP_ROWS, HAS_ENT_GRAD=has_ent,
        SPARSE=pairs is not None, USE_TMA=use_tma, PRECISION=_precision(hidden.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, maxnreg=max_registers(cfg),
    )


def _operand_types(dtype: str, cfg: KernelConfig) -> dict[str, str]:
    """Signature types of the h, w operands as `_operands` passes them: TMA descriptors for 16-bit, else pointers."""
    if dtype == "fp32":
        return {"h": "*fp32", "w": "*fp32"}
    return {"h": f"tensordesc<{dtype}[{cfg.block_n}, {cfg.block_h}]>",
            "w": f"tensordesc<{dtype}[{cfg.block_v}, {cfg.block_h}]>"}


def compile_specs() -> list[dict[str, object]]:
    """Ahead-of-time compile entries for bench/compile_report.py: each kernel variant × dtype at its GPU default.

    Each entry: kernel (the @triton.jit function), variant (str), dtype ("bf16" | "fp16" | "fp32"), signature
    ({runtime argument: Triton type such as "*bf16", "i32", "fp32", "tensordesc<bf16[128, 64]>"}), constexprs
    ({constexpr argument: value}), aligned (integer arguments assumed multiples of 16, as Qwen-sized H and row
    strides are; pointers always are), num_warps, num_stages, expect_wgmma (16-bit operands must reach Hopper's
    wgmma tensor-core instructions), and optionally maxnreg (the launch's register cap) and resident_per_sm (the
    programs per SM the config claims). The 16-bit GEMM kernels take TMA descriptors and the fp32 ones pointers,
    as the launchers pass them.
    """
    specs: list[dict[str, object]] = []
    scalars = {"N": "i32", "V": "i32", "H": "i32"}
    strides = {"stride_hn": "i32", "stride_wv": "i32"}
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype, torch_dtype in torch_dtypes.items():
        precision = _precision(torch_dtype)
        use_tma = dtype != "fp32"
        fwd, dlg = gpu_config("forward", torch_dtype), gpu_config("dlogits", torch_dtype)
        specs.append({
            "kernel": _forward_kernel, "variant": "entropy+tile lse", "dtype": dtype,
            "signature": {**_operand_types(dtype, fwd),
                          **{name: "*fp32" for name in ("max_ptr", "sum_ptr", "sumz_ptr", "tile_lse_ptr")},
                          **scalars, **strides, "inv_temperature": "fp32", "tiles_per_split": "i32",
                          "num_splits": "i32"},
            "constexprs": {"BLOCK_N": fwd.block_n, "BLOCK_V": fwd.block_v, "BLOCK_H": fwd.block_h,
                           "GROUP": GROUP_ROWS, "WITH_ENTROPY": True, "WITH_TILE_LSE": True, "USE_TMA": use_tma,
                           "PRECISION": precision},
            "aligned": ("H", "stride_hn", "stride_wv"), "num_warps": fwd.num_warps, "num_stages": fwd.num_stages,
            "expect_wgmma": use_tma, "maxnreg": max_registers(fwd), "resident_per_sm": fwd.resident_per_sm,
        })
        # The sparse backward runs without an entropy gradient only (dsrl_fast/ops/linear_logprobs.py).
        for has_ent, sparse in ((False, False), (True, False), (False, True)):
            specs.append({
                "kernel": _dlogits_kernel, "dtype": dtype,
                "variant": ("logp+entropy" if has_ent else "logp") + (" sparse" if sparse else ""),
                "signature": {**_operand_types(dtype, dlg), "labels_ptr": "*i64",
                              **{name: "*fp32" for name in ("lse_ptr", "entropy_ptr", "g_logp_ptr", "g_ent_ptr")},
                              "dz_ptr": f"*{dtype}", "pairs_ptr": "*i32", **scalars, "v_begin": "i32",
                              "slice_width": "i32", **strides, "stride_dzn": "i32", "inv_temperature": "fp32"},
                "constexprs": {"BLOCK_N": dlg.block_n, "BLOCK_V": dlg.block_v, "BLOCK_H": dlg.block_h,
                               "GROUP": GROUP_ROWS, "HAS_ENT_GRAD": has_ent, "SPARSE": sparse,
                               "USE_TMA": use_tma, "PRECISION": precision},
                "aligned": ("H", "stride_hn", "stride_wv", "stride_dzn"), "num_warps": dlg.num_warps,
                "num_stages": dlg.num_stages, "expect_wgmma": use_tma, "maxnreg": max_registers(dlg),
                "resident_per_sm": dlg.resident_per_sm,
            })
        specs.append({
            "kernel": _label_logit_kernel, "variant": "-", "dtype": dtype,
            "signature": {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "labels_ptr": "*i64", "out_ptr": "*fp32",
                          "N": "i32", "H": "i32", **strides, "inv_temperature": "fp32"},
            "constexprs": {"BLOCK_N": LABEL_BLOCK_N, "BLOCK_H": LABEL_BLOCK_H},
            "aligned": ("H", "stride_hn", "stride_wv"), "num_warps": 4, "num_stages": 1, "expect_wgmma": False,
        })
    return specs
