"""Tile configs and launch geometry of the fused log-prob kernels (kernels/linear_logprobs.py, sparse_grads.py).

The vetted configs per kernel and dtype, the forward's candidate set per token-count bucket, how many programs of
a config an SM holds (and the register cap that makes it so), when operands go through TMA descriptors, how many
vocabulary splits make the forward's grid whole waves, and how wide a backward slice is. The reasons and the
figures behind each choice are in kernels/linear_logprobs.py's docstring and bench/roofline.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton


class KernelConfig(NamedTuple):
    """Tile shape and launch options of one kernel. resident_per_sm: programs of this config an sm_90a SM holds at
    once, which sizes the waves; above 1 the launch caps the registers per thread to fit them (`max_registers`).
    tests/bench/test_compile_report.py checks the claim against the compile (registers, shared memory, no spills)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    resident_per_sm: int = 1


# Vetted defaults for Hopper (bf16/fp16 operands on wgmma tensor cores, fp32 accumulators, TMA loads). The forward
# runs two programs per SM (128 registers, 2 stages: 64 KiB of shared memory each, no spills), so one's softmax
# epilogue overlaps the other's MMA. fp32 operands run on FMA units and need smaller tiles to stay spill-free on
# sm_90a (see bench/compile_report.py). The interpreter runs Python per block op, so it gets the largest tiles that
# keep test shapes meaningful.
FORWARD_CONFIG = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=2, resident_per_sm=2)
DLOGITS_CONFIG = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3, resident_per_sm=1)
FP32_FORWARD_CONFIG = KernelConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2, resident_per_sm=1)
FP32_DLOGITS_CONFIG = KernelConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2, resident_per_sm=1)
INTERPRETER_CONFIG = KernelConfig(block_n=64, block_v=256, block_h=128, num_warps=1, num_stages=1)
# The forward's candidate set (bench/kernel_sweep.py times each per token-count bucket on a GPU) and, per bucket
# (upper bound on N, inclusive), the vetted choice. One table, not a run-time autotuner: a choice that changed
# between processes would change the forward's rounding, and runs must stay bitwise repeatable.
FORWARD_CANDIDATES = (
    FORWARD_CONFIG,
    KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3, resident_per_sm=1),
    KernelConfig(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3, resident_per_sm=1),
    KernelConfig(block_n=256, block_v=128, block_h=64, num_warps=8, num_stages=3, resident_per_sm=1),
    KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=4, resident_per_sm=1),
)
FORWARD_BUCKETS = ((4096, FORWARD_CONFIG), (16384, FORWARD_CONFIG), (1 << 62, FORWARD_CONFIG))
GROUP_ROWS = 8
REGISTERS_PER_SM = 65536
# The label-logit gather-dot kernel: rows per program, hidden columns per step.
LABEL_BLOCK_N = 32
LABEL_BLOCK_H = 128
NUM_SMS = 132
# Splits whose wave efficiency is within this of the best are equivalent; the fewest of them is taken.
SPLIT_EFFICIENCY_SLACK = 0.005
# The backward's dz slice stays within SLICE_LOGITS_SHARE of the fp32 logits (N·V·4 bytes); within that, the width
# keeps the d_hidden GEMM compute-bound (at least MIN_SLICE_WIDTH columns, ~4× the H100 ridge point) and picks the
# width whose d_weight GEMM (DWEIGHT_TILE output tiles) fills its last wave best; among near-equal widths
# (within WAVE_SLACK) the narrowest (least workspace).
SLICE_LOGITS_SHARE = 0.01
SLICE_MULTIPLE = 128
MIN_SLICE_WIDTH = 1280
DWEIGHT_TILE = (128, 256)
WAVE_SLACK = 0.03


def max_registers(cfg: KernelConfig) -> int | None:
    """Registers per thread a launch of `cfg` is capped at so resident_per_sm programs fit on an SM (None: no cap)."""
    if cfg.resident_per_sm <= 1:
        return None
    return REGISTERS_PER_SM // (cfg.resident_per_sm * cfg.num_warps * 32) // 8 * 8


def interpreting(t: torch.Tensor) -> bool:
    """Whether kernels over tensors like `t` run under the Triton interpreter (CPU tensors)."""
    return t.device.type == "cpu"


def gpu_config(kind: str, dtype: torch.dtype, n: int | None = None) -> KernelConfig:
    """The vetted GPU config of `kind` ("forward" or "dlogits") for operands of `dtype` (forward: by the bucket of
    the token count `n` in FORWARD_BUCKETS)."""
    assert kind in ("forward", "dlogits")
    if dtype == torch.float32:
        return FP32_FORWARD_CONFIG if kind == "forward" else FP32_DLOGITS_CONFIG
    if kind == "dlogits":
        return DLOGITS_CONFIG
    return next(cfg for bound, cfg in FORWARD_BUCKETS if n is None or n <= bound)


def default_config(kind: str, hidden: torch.Tensor) -> KernelConfig:
    """The vetted config of `kind` ("forward" or "dlogits") for tensors like `hidden` (device, dtype, rows)."""
    return INTERPRETER_CONFIG if interpreting(hidden) else gpu_config(kind, hidden.dtype, hidden.shape[0])


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the kernels load these 2-D tensors through TMA tensor descriptors: 16-bit (fp32 operands run on FMA
    units with small tiles, where descriptors spill on sm_90a), unit column stride, 16-byte aligned base and row
    stride, and a device that has TMA (sm_90+) or the interpreter."""
    for t in tensors:
        if t.element_size() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    device = tensors[0].device
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=256)
def num_splits(n_row_blocks: int, n_vocab_tiles: int, num_sms: int, resident_per_sm: int = 1) -> int:
    """Vocabulary splits of the forward: the grid (n_row_blocks × splits programs of ⌈tiles / splits⌉ tiles each)
    fills whole waves of num_sms × resident_per_sm programs. Wave efficiency = tiles × row blocks / (waves × slots ×
    tiles per split); the fewest splits within SPLIT_EFFICIENCY_SLACK of the best (fewer partial statistics)."""
    slots = num_sms * resident_per_sm
    best: list[tuple[float, int]] = []
    for s in range(1, min(n_vocab_tiles, 8 * slots) + 1):
        per_split = triton.cdiv(n_vocab_tiles, s)
        splits = triton.cdiv(n_vocab_tiles, per_split)
        waves = triton.cdiv(n_row_blocks * splits, slots)
        best.append((n_vocab_tiles * n_row_blocks / (waves * slots * per_split), splits))
    top = max(e for e, _ in best)
    return min(s for e, s in best if e >= top - SPLIT_EFFICIENCY_SLACK)


def _wave_fill(tiles: int, num_sms: int) -> float:
    return tiles / (triton.cdiv(tiles, num_sms) * num_sms)


def slice_width(vocab: int, element_size: int, hidden: int = 0, multiple: int = SLICE_MULTIPLE,
                num_sms: int = NUM_SMS) -> int:
    """Vocabulary columns per backward slice, a multiple of `multiple` (at least one), at most `vocab` rounded up.

    The dz slice (width × element_size bytes per row) stays within SLICE_LOGITS_SHARE of the row's fp32 logits.
    Within that cap, widths from MIN_SLICE_WIDTH up (the d_hidden GEMM stays compute-bound) are scored by how well
    the d_weight GEMM's output tiles (width × hidden in DWEIGHT_TILE tiles; all of its tiles when hidden is 0)
    fill their last wave on num_sms SMs; the narrowest within WAVE_SLACK of the best wins. Qwen3-4B (H = 2560,
    V = 151936, bf16): 1664 columns, 130 tiles, 98% of one wave (dz + fp32 accumulator 2.2% of the logits);
    Qwen3-8B (H = 4096): 2048 columns, 256 tiles, 97% of two waves (3.4%; 896 columns made the GEMM memory-bound).
    """
    full = triton.cdiv(vocab, multiple) * multiple
    cap = max(multiple, int(SLICE_LOGITS_SHARE * vocab * 4 / element_size) // multiple * multiple)
    low = min(max(multiple, MIN_SLICE_WIDTH // multiple * multiple), cap)
    candidates = range(low, min(cap, full) + 1, multiple)
    if not candidates:
        return min(cap, full)
    col_tiles = triton.cdiv(hidden, DWEIGHT_TILE[1]) if hidden else 1
    scores = {w: _wave_fill(triton.cdiv(w, DWEIGHT_TILE[0]) * col_tiles, num_sms) for w in candidates}
    top = max(scores.values())
    return min(w for w, s in scores.items() if s >= top - WAVE_SLACK)
