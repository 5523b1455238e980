"""Block-sparse d_hidden and d_weight GEMMs over the vocabulary tiles the backward keeps (tile skipping).

The backward of kernels/linear_logprobs.py with tile skipping (dsrl_fast/ops/tile_skip.py) writes dz only for the
kept (row block, vocabulary tile) pairs of a slice, one packed (BLOCK_N, BLOCK_V) tile per pair, pairs ordered by
row block then tile. These kernels then run the two gradient GEMMs over the kept tiles only:

- `_sparse_dhidden_kernel`, one program per (row block, BLOCK_H columns of H): d_hidden[rows] += Σ over the row
  block's kept tiles t of dz[rows, t] · W[t] (K = BLOCK_V per tile), into the fp32 accumulator of the backward.
- `_sparse_dweight_kernel`, one program per (vocabulary tile, BLOCK_H columns): d_weight[t] = Σ over the row blocks
  keeping t of dz[rows, t]ᵀ · hidden[rows], written once in the weight's dtype (zeros for a tile no row keeps).

Work: 2·BLOCK_N·BLOCK_V·H FLOPs per kept tile in each kernel (4·N_a·H·V·k for a kept share k); HBM: each kept dz
tile is read H/BLOCK_H times (from L2 after the first), W and hidden tiles once per (tile, program), and the fp32
d_hidden block is read and written once per slice by each row block with a kept tile. Each program owns its output
block and sums in a fixed order (the pair order): no atomics, bitwise-repeatable. At Triton's MMA rate (~60% of
peak, against cuBLAS's ~75-80%) skipping pays once the kept share is below ~0.75 (bench/roofline.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dsrl_fast.kernels.fused_tiles import tma_ok


class SparseConfig(NamedTuple):
    """Output columns per program (block_h) and launch options; the tile (block_n × block_v) is the dz kernel's."""

    block_h: int
    num_warps: int
    num_stages: int


GPU_CONFIG = SparseConfig(block_h=128, num_warps=8, num_stages=3)
FP32_GPU_CONFIG = SparseConfig(block_h=64, num_warps=8, num_stages=2)
INTERPRETER_CONFIG = SparseConfig(block_h=128, num_warps=1, num_stages=1)


@triton.jit
def _sparse_dhidden_kernel(dz, w, tiles_ptr, row_ptr_ptr, dh_ptr, N, V, H, stride_dzn, stride_wv, stride_dhn,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                           USE_TMA: tl.constexpr, PRECISION: tl.constexpr):
    n_h = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    row_block = pid // n_h
    h0 = (pid % n_h) * BLOCK_H
    start = tl.load(row_ptr_ptr + row_block)
    stop = tl.load(row_ptr_ptr + row_block + 1)
    if stop > start:
        offs_r = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_V)
        offs_h = h0 + tl.arange(0, BLOCK_H)
        acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        if not USE_TMA:
            a_ptrs = dz + start.to(tl.int64) * BLOCK_N * stride_dzn + offs_r[:, None] * stride_dzn + offs_c[None, :]
        for i in range(start, stop):
            v0 = tl.load(tiles_ptr + i) * BLOCK_V
            if USE_TMA:
                a = dz.load([i * BLOCK_N, 0])
                b = w.load([v0, h0])
            else:
                a = tl.load(a_ptrs)
                a_ptrs += BLOCK_N * stride_dzn
                b = tl.load(w + (v0 + offs_c)[:, None].to(tl.int64) * stride_wv + offs_h[None, :],
                            mask=((v0 + offs_c) < V)[:, None] & (offs_h < H)[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        rows = row_block * BLOCK_N + offs_r
        ok = (rows < N)[:, None] & (offs_h < H)[None, :]
        out = dh_ptr + rows[:, None].to(tl.int64) * stride_dhn + offs_h[None, :]
        tl.store(out, tl.load(out, mask=ok, other=0.0) + acc, mask=ok)


@triton.jit
def _sparse_dweight_kernel(dz, h, slots_ptr, row_blocks_ptr, col_ptr_ptr, dw_ptr, N, V, H, tile_begin, stride_dzn,
                           stride_hn, stride_dwv, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                           BLOCK_H: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr):
    n_h = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    local_tile = pid // n_h
    h0 = (pid % n_h) * BLOCK_H
    start = tl.load(col_ptr_ptr + local_tile)
    stop = tl.load(col_ptr_ptr + local_tile + 1)
    offs_r = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_V)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for j in range(start, stop):
        slot = tl.load(slots_ptr + j)
        row0 = tl.load(row_blocks_ptr + j) * BLOCK_N
        if USE_TMA:
            a = dz.load([slot * BLOCK_N, 0])
            b = h.load([row0, h0])
        else:
            a = tl.load(dz + slot.to(tl.int64) * BLOCK_N * stride_dzn + offs_r[:, None] * stride_dzn
                        + offs_c[None, :])
            b = tl.load(h + (row0 + offs_r)[:, None].to(tl.int64) * stride_hn + offs_h[None, :],
                        mask=((row0 + offs_r) < N)[:, None] & (offs_h < H)[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    rows = (tile_begin + local_tile) * BLOCK_V + offs_c
    ok = (rows < V)[:, None] & (offs_h < H)[None, :]
    tl.store(dw_ptr + rows[:, None].to(tl.int64) * stride_dwv + offs_h[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=ok)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def default_config(hidden: torch.Tensor) -> SparseConfig:
    """The vetted config for tensors like `hidden` (device and dtype)."""
    if hidden.device.type == "cpu":
        return INTERPRETER_CONFIG
    return FP32_GPU_CONFIG if hidden.dtype == torch.float32 else GPU_CONFIG


def sparse_dhidden(dz_tiles: torch.Tensor, weight: torch.Tensor, tiles: torch.Tensor, row_ptr: torch.Tensor,
                   d_hidden: torch.Tensor, config: SparseConfig | None = None) -> None:
    """d_hidden += Σ_t dz[rows, t] · weight[t] over the kept tiles of each row block.

    dz_tiles: (P, block_n, block_v) contiguous, the packed tiles of one slice in pair order (row block, then tile);
    weight: (V, H), dz's dtype; tiles: (P,) int32 vocabulary tile of each packed tile; row_ptr: (row blocks + 1,)
    int32, the packed tiles of row block b are [row_ptr[b], row_ptr[b + 1]); d_hidden: (N, H) fp32, unit column
    stride, accumulated in place.
    """
    p, block_n, block_v = dz_tiles.shape
    n, h_dim = d_hidden.shape
    assert dz_tiles.is_contiguous() and dz_tiles.dtype == weight.dtype and d_hidden.dtype == torch.float32
    assert tiles.dtype == row_ptr.dtype == torch.int32 and tiles.shape == (p,) and d_hidden.stride(1) == 1
    assert row_ptr.shape == (triton.cdiv(n, block_n) + 1,) and weight.stride(1) == 1
    if p == 0:
        return
    cfg = config or default_config(weight)
    flat = dz_tiles.view(p * block_n, block_v)
    use_tma = tma_ok(flat, weight)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        dz_arg: object = TensorDescriptor.from_tensor(flat, [block_n, block_v])
        w_arg: object = TensorDescriptor.from_tensor(weight, [block_v, cfg.block_h])
    else:
        dz_arg, w_arg = flat, weight
    grid = (triton.cdiv(n, block_n) * triton.cdiv(h_dim, cfg.block_h),)
    _sparse_dhidden_kernel[grid](
        dz_arg, w_arg, tiles, row_ptr, d_hidden, n, weight.shape[0], h_dim, block_v, weight.stride(0),
        d_hidden.stride(0), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg.block_h, USE_TMA=use_tma,
        PRECISION=_precision(weight.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def sparse_dweight(dz_tiles: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor, row_blocks: torch.Tensor,
                   col_ptr: torch.Tensor, d_weight: torch.Tensor, tile_begin: int,
                   config: SparseConfig | None = None) -> None:
    """d_weight[t] = Σ_b dz[rows of b, t]ᵀ · hidden[rows of b] for the vocabulary tiles t of one slice.

    dz_tiles: (P, block_n, block_v) as in sparse_dhidden; hidden: (N, H), dz's dtype, the rows of the backward;
    slots, row_blocks: (P,) int32, the packed tile and row block of each pair in (tile, row block) order; col_ptr:
    (T + 1,) int32, the pairs of the slice's tile tile_begin + t are [col_ptr[t], col_ptr[t + 1]); d_weight: (V, H)
    unit column stride, its rows of the slice's T tiles written (zeros where no row block keeps the tile).
    """
    p, block_n, block_v = dz_tiles.shape
    n, h_dim = hidden.shape
    v = d_weight.shape[0]
    n_tiles = col_ptr.shape[0] - 1
    assert dz_tiles.is_contiguous() and dz_tiles.dtype == hidden.dtype and d_weight.stride(1) == 1
    assert slots.dtype == row_blocks.dtype == col_ptr.dtype == torch.int32 and slots.shape == row_blocks.shape == (p,)
    assert n_tiles > 0 and hidden.stride(1) == 1 and tile_begin * block_v < v
    cfg = config or default_config(hidden)
    flat = dz_tiles.view(max(p, 1) * block_n, block_v) if p else dz_tiles.new_zeros(block_n, block_v)
    use_tma = tma_ok(flat, hidden)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        dz_arg: object = TensorDescriptor.from_tensor(flat, [block_n, block_v])
        h_arg: object = TensorDescriptor.from_tensor(hidden, [block_n, cfg.block_h])
    else:
        dz_arg, h_arg = flat, hidden
    grid = (n_tiles * triton.cdiv(h_dim, cfg.block_h),)
    _sparse_dweight_kernel[grid](
        dz_arg, h_arg, slots, row_blocks, col_ptr, d_weight, n, v, h_dim, tile_begin, block_v, hidden.stride(0),
        d_weight.stride(0), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg.block_h, USE_TMA=use_tma,
        PRECISION=_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def compile_specs() -> list[dict[str, object]]:
    """Compile entries for bench/compile_report.py (keys as in kernels/linear_logprobs.py): both kernels × dtype at
    the GPU default, with the dz kernel's tile (kernels/linear_logprobs.py DLOGITS_CONFIG / FP32_DLOGITS_CONFIG);
    16-bit operands through TMA descriptors, fp32 through pointers, as the launchers pass them."""
    from dsrl_fast.kernels.fused_tiles import DLOGITS_CONFIG, FP32_DLOGITS_CONFIG

    specs: list[dict[str, object]] = []
    for dtype in ("bf16", "fp16", "fp32"):
        tile = FP32_DLOGITS_CONFIG if dtype == "fp32" else DLOGITS_CONFIG
        cfg = FP32_GPU_CONFIG if dtype == "fp32" else GPU_CONFIG
        bn, bv, bh = tile.block_n, tile.block_v, cfg.block_h
        tma = dtype != "fp32"

        def operand(rows: int, cols: int, dtype: str = dtype, tma: bool = tma) -> str:
            return f"tensordesc<{dtype}[{rows}, {cols}]>" if tma else f"*{dtype}"

        common = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "USE_TMA": tma,
                  "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        specs.append({
            "kernel": _sparse_dhidden_kernel, "variant": "-", "dtype": dtype,
            "signature": {"dz": operand(bn, bv), "w": operand(bv, bh), "tiles_ptr": "*i32", "row_ptr_ptr": "*i32",
                          "dh_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_dzn": "i32",
                          "stride_wv": "i32", "stride_dhn": "i32"},
            "constexprs": common, "aligned": ("H", "stride_dzn", "stride_wv", "stride_dhn"),
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "expect_wgmma": tma,
        })
        specs.append({
            "kernel": _sparse_dweight_kernel, "variant": "-", "dtype": dtype,
            "signature": {"dz": operand(bn, bv), "h": operand(bn, bh), "slots_ptr": "*i32",
                          "row_blocks_ptr": "*i32", "col_ptr_ptr": "*i32", "dw_ptr": f"*{dtype}", "N": "i32",
                          "V": "i32", "H": "i32", "tile_begin": "i32", "stride_dzn": "i32", "stride_hn": "i32",
                          "stride_dwv": "i32"},
            "constexprs": common, "aligned": ("H", "stride_dzn", "stride_hn", "stride_dwv"),
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "expect_wgmma": tma,
        })
    return specs
