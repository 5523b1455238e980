"""The launches of each fused-loss path at a shape, for bench/roofline_model.py (bf16 operands, every row with a
gradient unless a kept share of vocabulary tiles is given).

- "no-logits" (impl="triton", kernels/linear_logprobs.py): the forward kernel with its vetted config and splits,
  the label-logit gather, the statistics merge and (with tile skipping) the tile masses; the backward's row
  compaction, per slice the dz kernel and cuBLAS d_hidden / d_weight, the final cast. With a kept share k of the
  (row block, vocabulary tile) pairs, the sparse backward instead: planning (a host sync), per slice of
  `capacity` kept pairs the sparse dz kernel and the block-sparse d_hidden / d_weight kernels (kept pairs spread
  evenly over row blocks and tiles: the model ignores the load imbalance of head tiles kept by every row block).
- "gradient-in-forward" (impl="grad_in_forward", dsrl_fast/ops/grad_in_forward.py): per chunk of fp32 logits
  (1 GiB) the cuBLAS logits GEMM, the two row kernels, the per-chunk token gradient (~40 small launches), cuBLAS
  d_hidden and d_weight (fp32 accumulation, the op's default), then the d_weight cast.
"""

from __future__ import annotations

import dataclasses
import math

from bench.roofline_model import Gpu, Launch, Params, cublas_launch, reference_seconds, total_seconds
from bench.roofline_model import stream_launch as stream
from bench.roofline_model import triton_launch as triton
from dsrl_fast.kernels import fused_tiles as tiles
from dsrl_fast.kernels import sparse_grads

ELEMENT = 2
SHAPES = {"qwen3-4b": (2560, 151936), "qwen3-8b": (4096, 151936)}
GIF_WORKSPACE = 1 << 30
TOKEN_GRAD_LAUNCHES = 40
# Host time of the sparse plan: one device-to-host copy and numpy over RB × T booleans (~2e5 at N = 16k).
PLAN_HOST_S = 2e-3
# Liger-Kernel's SM90 CuTe fused linear cross-entropy backward: 657 TFLOP/s at 4·N·H·V (its docstring, H200).
LIGER_SM90_BACKWARD_FLOPS = 657e12


@dataclasses.dataclass(frozen=True)
class PathModel:
    """The launches of one path at one shape; kept_share None for a dense backward."""

    path: str
    shape: str
    n: int
    h: int
    v: int
    forward: list[Launch]
    backward: list[Launch]
    workspace_bytes: float
    kept_share: float | None = None

    def times(self, gpu: Gpu, p: Params) -> tuple[float, float]:
        """(forward seconds, backward seconds)."""
        return total_seconds(self.forward, gpu, p), total_seconds(self.backward, gpu, p)

    def share(self, gpu: Gpu, p: Params) -> float:
        """The same-run 6·N·H·V cuBLAS time over this path's time."""
        return reference_seconds(self.n, self.h, self.v, gpu, p) / sum(self.times(gpu, p))

    @property
    def logits_share(self) -> float:
        return self.workspace_bytes / (self.n * self.v * 4.0)


def forward_kernel(n: int, h: int, v: int, skipping: bool) -> Launch:
    """The forward kernel with its vetted config and the splits fused_tiles picks (tile logsumexps if skipping)."""
    cfg = tiles.FORWARD_CONFIG
    row_blocks = math.ceil(n / cfg.block_n)
    n_tiles = math.ceil(v / cfg.block_v)
    splits = tiles.num_splits(row_blocks, n_tiles, tiles.NUM_SMS, cfg.resident_per_sm)
    per_split = math.ceil(n_tiles / splits)
    splits = math.ceil(n_tiles / per_split)
    # Grouped raster: GROUP_ROWS row blocks stream each weight tile together (from L2 after the first).
    hbm = v * h * ELEMENT * math.ceil(row_blocks / tiles.GROUP_ROWS) + n * h * ELEMENT + 12.0 * splits * n
    return triton("forward kernel", row_blocks * splits, per_split, 2.0 * cfg.block_n * cfg.block_v * h,
                  cfg.block_n * cfg.block_v, cfg.resident_per_sm, hbm + (4.0 * n_tiles * n if skipping else 0.0))


def _forward(n: int, h: int, v: int, skipping: bool) -> list[Launch]:
    launches = [forward_kernel(n, h, v, skipping), stream("label-logit gather", 2.0 * n * h * ELEMENT),
                stream("merge split statistics", 24.0 * 3 * n, count=8)]
    if skipping:
        launches.append(stream("tile masses", math.ceil(v / tiles.FORWARD_CONFIG.block_v) * n * 6.0, count=4))
    return launches


def dz_kernel(n: int, h: int, cols: int, count: int = 1) -> Launch:
    """The dense dz kernel over one slice of `cols` columns of n rows."""
    cfg = tiles.DLOGITS_CONFIG
    programs = math.ceil(n / cfg.block_n) * math.ceil(cols / cfg.block_v)
    return triton(f"dz kernel ({cols} columns)", programs, 1, 2.0 * cfg.block_n * cfg.block_v * h,
                  cfg.block_n * cfg.block_v, cfg.resident_per_sm,
                  n * h * ELEMENT + cols * h * ELEMENT + n * cols * ELEMENT, count)


def dhidden_gemm(n: int, h: int, cols: int, count: int = 1) -> Launch:
    """cuBLAS d_hidden (n, h) fp32 += dz (n, cols) · W_slice (cols, h)."""
    return cublas_launch(f"cuBLAS d_hidden += dz·W ({cols})", n, h, cols,
                         n * cols * ELEMENT + cols * h * ELEMENT + n * h * 8.0, count)


def dweight_gemm(n: int, h: int, cols: int, count: int = 1) -> Launch:
    """cuBLAS d_weight slice (cols, h) = dzᵀ (cols, n) · hidden (n, h)."""
    return cublas_launch(f"cuBLAS d_weight = dzᵀ·h ({cols})", cols, h, n,
                         n * cols * ELEMENT + n * h * ELEMENT + cols * h * ELEMENT, count)


def _dense_backward(n: int, h: int, v: int, width: int) -> list[Launch]:
    launches = [stream("compact rows", 2.0 * n * h * ELEMENT, count=6)]
    full, tail = divmod(v, width)
    for cols, count in ((width, full), (tail, 1 if tail else 0)):
        if count:
            launches += [dz_kernel(n, h, cols, count), dhidden_gemm(n, h, cols, count),
                         dweight_gemm(n, h, cols, count)]
    launches.append(stream("cast d_hidden", n * h * (4.0 + ELEMENT) + n * h * ELEMENT))
    return launches


def sparse_kernels(n: int, h: int, pairs: int, tiles_in_slice: int, count: int = 1) -> list[Launch]:
    """The sparse dz, d_hidden and d_weight kernels of one slice holding `pairs` kept pairs over `tiles_in_slice`
    vocabulary tiles of n rows (pairs spread evenly over row blocks and tiles)."""
    cfg = tiles.DLOGITS_CONFIG
    block_h = sparse_grads.GPU_CONFIG.block_h
    row_blocks = math.ceil(n / cfg.block_n)
    h_tiles = math.ceil(h / block_h)
    tile_bytes = cfg.block_n * cfg.block_v * ELEMENT
    w_slice = tiles_in_slice * cfg.block_v * h * ELEMENT
    return [
        triton("sparse dz kernel", pairs, 1, 2.0 * cfg.block_n * cfg.block_v * h, cfg.block_n * cfg.block_v,
               cfg.resident_per_sm, pairs * tile_bytes + n * h * ELEMENT + w_slice, count),
        triton("sparse d_hidden", row_blocks * h_tiles, max(1, round(pairs / row_blocks)),
               2.0 * cfg.block_n * cfg.block_v * block_h, 0.0, 1, pairs * tile_bytes + w_slice + n * h * 8.0, count),
        triton("sparse d_weight", tiles_in_slice * h_tiles, max(1, round(pairs / tiles_in_slice)),
               2.0 * cfg.block_v * cfg.block_n * block_h, 0.0, 1, pairs * tile_bytes + n * h * ELEMENT + w_slice,
               count),
    ]


def _sparse_backward(n: int, h: int, v: int, width: int, kept: float) -> list[Launch]:
    cfg = tiles.DLOGITS_CONFIG
    row_blocks = math.ceil(n / cfg.block_n)
    n_tiles = math.ceil(v / cfg.block_v)
    capacity = row_blocks * max(1, width // cfg.block_v)
    pairs = max(1, round(kept * row_blocks * n_tiles))
    slices = math.ceil(pairs / capacity)
    return [
        stream("compact rows", 2.0 * n * h * ELEMENT, count=6),
        stream("plan kept pairs", 8.0 * n_tiles * n, count=10, host_s=PLAN_HOST_S / 10),
        *sparse_kernels(n, h, math.ceil(pairs / slices), math.ceil(n_tiles / slices), slices),
        stream("cast d_hidden", n * h * (4.0 + ELEMENT) + n * h * ELEMENT),
    ]


def no_logits(shape: str, n: int, kept_share: float | None = None, width: int | None = None) -> PathModel:
    """The no-logits path; kept_share: the share of (row block, tile) pairs the sparse backward computes (None:
    dense); width: the backward slice (default: kernels' slice_width)."""
    h, v = SHAPES[shape]
    width = width or tiles.slice_width(v, ELEMENT, h)
    backward = _dense_backward(n, h, v, width) if kept_share is None else _sparse_backward(n, h, v, width, kept_share)
    workspace = n * width * ELEMENT + n * h * 4.0 + (math.ceil(v / tiles.FORWARD_CONFIG.block_v) * n * 2.0
                                                     if kept_share is not None else 0.0)
    return PathModel("no-logits", shape, n, h, v, _forward(n, h, v, kept_share is not None), backward, workspace,
                     kept_share)


def gif_chunk(rows: int, h: int, v: int, weight_grad_fp32: bool = True, count: int = 1) -> list[Launch]:
    """The launches of one gradient-in-forward chunk of `rows` rows."""
    acc = 8.0 if weight_grad_fp32 else 2.0 * ELEMENT
    return [
        cublas_launch(f"cuBLAS fp32 logits ({rows} rows)", rows, v, h,
                      rows * v * 4.0 + v * h * ELEMENT + rows * h * ELEMENT, count),
        stream("row statistics kernel", rows * v * 4.0, count),
        stream("token gradient (autograd, small ops)", 64.0 * rows, count * TOKEN_GRAD_LAUNCHES),
        stream("row gradient kernel (dz over the logits)", rows * v * (4.0 + ELEMENT), count),
        cublas_launch("cuBLAS d_hidden = dz·W", rows, h, v, rows * v * ELEMENT + v * h * ELEMENT
                      + rows * h * ELEMENT, count),
        cublas_launch("cuBLAS d_weight += dzᵀ·h", v, h, rows, rows * v * ELEMENT + rows * h * ELEMENT + v * h * acc,
                      count),
    ]


def grad_in_forward(shape: str, n: int, weight_grad_fp32: bool = True) -> PathModel:
    h, v = SHAPES[shape]
    chunk = min(n, GIF_WORKSPACE // (v * 4))
    full, tail = divmod(n, chunk)
    launches: list[Launch] = []
    for rows, count in ((chunk, full), (tail, 1 if tail else 0)):
        if count:
            launches += gif_chunk(rows, h, v, weight_grad_fp32, count)
    if weight_grad_fp32:
        launches.append(stream("cast d_weight", v * h * (4.0 + ELEMENT)))
    backward = [stream("scale the precomputed gradients", 2.0 * (n * h + v * h) * ELEMENT, count=2)]
    workspace = chunk * v * 4.0 + (v * h * 4.0 if weight_grad_fp32 else 0.0)
    return PathModel("gradient-in-forward", shape, n, h, v, launches, backward, workspace)


def liger_backward_seconds(n: int, h: int, v: int) -> float:
    """Liger's SM90 CuTe backward at its own reported rate (4·N·H·V at 657 TFLOP/s, H200): the goal to beat."""
    return 4.0 * n * h * v / LIGER_SM90_BACKWARD_FLOPS
