"""Token log-probs and entropy straight from hidden states and the LM-head weight, never storing all logits.

Work and bound (N tokens, N_a of them with a nonzero gradient, hidden H, vocabulary V, 16-bit operands):

- Forward (`_forward_kernel`): one logits GEMM, 2·N·H·V FLOPs, with an online logsumexp/entropy epilogue; it writes
  4 fp32 statistics per (row, vocabulary split) and nothing per logit. The 1-D grid is rastered so that the
  programs running at once cover few row blocks and every split: their hidden panels (GROUP × BLOCK_N × H) stay in
  L2 and each weight tile streamed from HBM is shared by the row blocks in flight. HBM traffic is then
  hidden once + weight × ⌈row blocks / row blocks in flight⌉, far below the GEMM time at Qwen shapes.
- Backward, per vocabulary slice of width S (`_dlogits_kernel` + two cuBLAS GEMMs): the kernel recomputes the
  logits tile of the slice (2·N_a·H·S), applies the softmax/entropy gradient epilogue and writes the slice of
  dz (N_a, S) in the input dtype; cuBLAS then accumulates d_hidden += dz·W_slice into an fp32 (N_a, H) buffer
  (2·N_a·H·S) and writes d_weight[slice] = dzᵀ·h once (2·N_a·H·S). Dense work is 8·N_a·H·V in total, every FLOP on
  tensor cores, and every reduction is either inside a GEMM's K loop or grid-ordered: no atomics, so two runs give
  bitwise-identical gradients. Rows with zero gradient (masked, NSR-filtered, zero-advantage) are compacted away
  before the backward, so its cost is proportional to the rows kept.
- Why this reaches its bound: each step is a compute-bound GEMM (arithmetic intensity ≥ ~700 FLOP/byte at Qwen
  shapes against the ~165 FLOP/byte ridge of an H100/H200); the only extra HBM traffic is the dz slice (written
  once, read twice inside compute-bound GEMMs) and the fp32 d_hidden read-modify-write per slice. The ceiling is
  6/8 = 75% of the 6·N·H·V cuBLAS rate for a path that keeps no logits (bench/roofline.py gives the prediction per
  shape). The workspace is the dz slice, N_a·S·2 bytes, plus the fp32 d_hidden accumulator, N_a·H·4 bytes: S is
  chosen (slice_width) so that both stay within 3% of the fp32 logits where H leaves room (Qwen3-4B 2.7%, -8B 3.0%);
  at 8B the narrower slices (896 columns instead of 2,944) cost 1-2 points of the predicted rate (72-74%, was 74-75%)
  in extra d_hidden traffic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class KernelConfig(NamedTuple):
    """Tile shape and launch options of one kernel."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# Vetted defaults for Hopper/Ampere (bf16/fp16 operands on wgmma tensor cores, fp32 accumulators). fp32 operands
# run on FMA units and need smaller tiles to stay spill-free on sm_90a (see bench/compile_report.py). The
# interpreter runs Python per block op, so it gets the largest tiles that keep test shapes meaningful.
FORWARD_CONFIG = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
DLOGITS_CONFIG = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
FP32_FORWARD_CONFIG = KernelConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2)
FP32_DLOGITS_CONFIG = KernelConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2)
INTERPRETER_CONFIG = KernelConfig(block_n=64, block_v=256, block_h=128, num_warps=1, num_stages=1)
GROUP_ROWS = 8
# The backward's workspace (the dz slice plus the fp32 d_hidden accumulator) stays within WORKSPACE_LOGITS_SHARE of
# the fp32 logits (N·V·4 bytes) where the accumulator leaves room; the dz slice alone never exceeds
# SLICE_LOGITS_SHARE (wider slices gain nothing once the GEMMs are large).
WORKSPACE_LOGITS_SHARE = 0.03
SLICE_LOGITS_SHARE = 0.01
SLICE_MULTIPLE = 128
MIN_BUDGET_SLICES = 4


class Partials(NamedTuple):
    """Per-split statistics of the forward pass, each (splits, N) fp32."""

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
def _logits_tile(h_ptr, w_ptr, offs_n, offs_v, N, v_end, H, stride_hn, stride_wv, inv_temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of hidden @ weight.T / temperature; columns at or past v_end = -inf."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_ok = offs_n < N
    col_ok = offs_v < v_end
    for h0 in range(0, H, BLOCK_H):
        h_ok = (h0 + offs_h) < H
        h = tl.load(h_ptr + offs_n[:, None].to(tl.int64) * stride_hn + (h0 + offs_h)[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_wv + (h0 + offs_h)[None, :],
                    mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _forward_kernel(h_ptr, w_ptr, labels_ptr, max_ptr, sum_ptr, sumz_ptr, label_ptr,
                    N, V, H, stride_hn, stride_wv, inv_temperature, tiles_per_split, num_splits,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sumz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_temperature,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            run_sumz = run_sumz * rescale + tl.sum(p * tl.where(p > 0, z, 0.0), axis=1)
        run_max = new_max
        label_logit += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
    out = split.to(tl.int64) * N + offs_n
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)
    tl.store(sumz_ptr + out, run_sumz, mask=row_ok)
    tl.store(label_ptr + out, label_logit, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dz_ptr,
                    N, V, H, v_begin, slice_width, stride_hn, stride_wv, stride_dzn, inv_temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                    HAS_ENT_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """dz[:, c] = d loss / d z[:, v_begin + c] for the columns c < slice_width of one vocabulary slice."""
    pid_n, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(slice_width, BLOCK_V), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_begin + offs_c
    v_end = tl.minimum(v_begin + slice_width, V)
    row_ok = offs_n < N
    col_ok = offs_v < v_end

    z = _logits_tile(h_ptr, w_ptr, offs_n, offs_v, N, v_end, H, stride_hn, stride_wv, inv_temperature,
                     BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
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
    dz = tl.where(mask, dz * inv_temperature, 0.0)
    tl.store(dz_ptr + offs_n[:, None].to(tl.int64) * stride_dzn + offs_c[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 semantics (no silent TF32); 16-bit operands use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def gpu_config(kind: str, dtype: torch.dtype) -> KernelConfig:
    """The vetted GPU config of `kind` ("forward" or "dlogits") for operands of `dtype`."""
    assert kind in ("forward", "dlogits")
    if dtype == torch.float32:
        return FP32_FORWARD_CONFIG if kind == "forward" else FP32_DLOGITS_CONFIG
    return FORWARD_CONFIG if kind == "forward" else DLOGITS_CONFIG


def default_config(kind: str, hidden: torch.Tensor) -> KernelConfig:
    """The vetted config of `kind` ("forward" or "dlogits") for tensors like `hidden` (device and dtype)."""
    return INTERPRETER_CONFIG if _interpreting(hidden) else gpu_config(kind, hidden.dtype)


def num_splits(n_row_blocks: int, n_vocab_tiles: int, num_sms: int) -> int:
    """Vocabulary splits of the forward: about 4 programs per SM in total, at least one tile per split."""
    return max(1, min(n_vocab_tiles, triton.cdiv(4 * num_sms, n_row_blocks)))


def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def forward_partials(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
                     with_entropy: bool, config: KernelConfig | None = None,
                     splits: int | None = None) -> Partials:
    """Launch the forward kernel.

    hidden: (N, H) fp32/fp16/bf16, unit stride on H; weight: (V, H) same dtype; labels: (N,) int64 in [0, V).
    Returns Partials of (splits, N) fp32 tensors, merged by `combine_partials`.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    assert hidden.stride(1) == 1 and weight.stride(1) == 1 and labels.is_contiguous()
    assert weight.dtype == hidden.dtype and n > 0
    cfg = config or default_config("forward", hidden)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    n_vocab_tiles = triton.cdiv(v, cfg.block_v)
    if splits is None:
        splits = num_splits(n_row_blocks, n_vocab_tiles, _device_sms(hidden.device))
        splits = min(splits, 2) if hidden.device.type != "cuda" else splits
    tiles_per_split = triton.cdiv(n_vocab_tiles, splits)
    splits = triton.cdiv(n_vocab_tiles, tiles_per_split)
    stats = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    _forward_kernel[(n_row_blocks * splits,)](
        hidden, weight, labels, stats[0], stats[1], stats[2], stats[3],
        n, v, h_dim, hidden.stride(0), weight.stride(0), inv_temperature, tiles_per_split, splits,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=GROUP_ROWS, WITH_ENTROPY=with_entropy,
        PRECISION=_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return Partials(stats[0], stats[1], stats[2], stats[3])


def combine_partials(partials: Partials) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge split statistics into (lse, label_logit, entropy), each (N,) fp32 (entropy = lse - E_p[z])."""
    row_max = partials.row_max.amax(dim=0)
    scale = torch.exp(partials.row_max - row_max)
    total = (partials.sum_exp * scale).sum(dim=0)
    lse = row_max + torch.log(total)
    mean_z = (partials.sum_exp_z * scale).sum(dim=0) / total
    return lse, partials.label_logit.sum(dim=0), lse - mean_z


def slice_width(vocab: int, element_size: int, hidden: int = 0, multiple: int = SLICE_MULTIPLE) -> int:
    """Vocabulary columns per backward slice, a multiple of `multiple` (at least one).

    Per scored row the backward holds width × element_size bytes of dz and hidden × 4 bytes of fp32 d_hidden
    accumulator. The width keeps both within WORKSPACE_LOGITS_SHARE of the row's fp32 logits (vocab × 4 bytes) and
    the dz slice within SLICE_LOGITS_SHARE. Where the accumulator leaves less than MIN_BUDGET_SLICES × `multiple`
    columns (hidden near 3% of vocab or above) the budget cannot be met without starving the GEMMs, and the dz slice
    takes its SLICE_LOGITS_SHARE width.
    """
    cap = int(SLICE_LOGITS_SHARE * vocab * 4 / element_size) // multiple * multiple
    budget = int((WORKSPACE_LOGITS_SHARE * vocab * 4 - hidden * 4) / element_size) // multiple * multiple
    width = min(budget, cap) if budget >= MIN_BUDGET_SLICES * multiple else cap
    return max(multiple, min(width, triton.cdiv(vocab, multiple) * multiple))


def dlogits_slice(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                  entropy: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
                  inv_temperature: float, v_begin: int, out: torch.Tensor,
                  config: KernelConfig | None = None) -> None:
    """Launch the dz kernel for the vocabulary columns [v_begin, v_begin + out.shape[1]) of rows `hidden`.

    hidden: (N, H); weight: (V, H) same dtype; labels, lse, grad_logprobs (and entropy, grad_entropy when the entropy
    has a gradient): (N,) contiguous, fp32 except labels (int64). out: (N, S) in hidden's dtype, unit column stride;
    receives d loss / d logits (the softmax and entropy gradients, divided by the temperature).
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    width = out.shape[1]
    assert out.shape[0] == n and out.stride(1) == 1 and out.dtype == hidden.dtype
    assert grad_logprobs.dtype == torch.float32 and grad_logprobs.is_contiguous() and lse.is_contiguous()
    assert (entropy is None) == (grad_entropy is None) and 0 <= v_begin < v and v_begin + width <= v
    cfg = config or default_config("dlogits", hidden)
    has_ent = grad_entropy is not None
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(width, cfg.block_v),)
    _dlogits_kernel[grid](
        hidden, weight, labels, lse, entropy if has_ent else lse, grad_logprobs,
        grad_entropy if has_ent else grad_logprobs, out,
        n, v, h_dim, v_begin, width, hidden.stride(0), weight.stride(0), out.stride(0), inv_temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=GROUP_ROWS,
        HAS_ENT_GRAD=has_ent, PRECISION=_precision(hidden.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def compile_specs() -> list[dict[str, object]]:
    """Ahead-of-time compile entries for bench/compile_report.py: each kernel variant × dtype at its GPU default.

    Each entry: kernel (the @triton.jit function), variant (str), dtype ("bf16" | "fp16" | "fp32"), signature
    ({runtime argument: Triton type such as "*bf16", "i32", "fp32"}), constexprs ({constexpr argument: value}),
    aligned (integer arguments assumed multiples of 16, as Qwen-sized H and row strides are; pointers always are),
    num_warps, num_stages, expect_wgmma (16-bit operands must reach Hopper's wgmma tensor-core instructions).
    """
    specs: list[dict[str, object]] = []
    scalars = {"N": "i32", "V": "i32", "H": "i32"}
    strides = {"stride_hn": "i32", "stride_wv": "i32"}
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype, torch_dtype in torch_dtypes.items():
        precision = _precision(torch_dtype)
        inputs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "labels_ptr": "*i64"}
        fwd, dlg = gpu_config("forward", torch_dtype), gpu_config("dlogits", torch_dtype)
        specs.append({
            "kernel": _forward_kernel, "variant": "entropy", "dtype": dtype,
            "signature": {**inputs, **{name: "*fp32" for name in ("max_ptr", "sum_ptr", "sumz_ptr", "label_ptr")},
                          **scalars, **strides, "inv_temperature": "fp32", "tiles_per_split": "i32",
                          "num_splits": "i32"},
            "constexprs": {"BLOCK_N": fwd.block_n, "BLOCK_V": fwd.block_v, "BLOCK_H": fwd.block_h,
                           "GROUP": GROUP_ROWS, "WITH_ENTROPY": True, "PRECISION": precision},
            "aligned": ("H", "stride_hn", "stride_wv"), "num_warps": fwd.num_warps, "num_stages": fwd.num_stages,
            "expect_wgmma": dtype != "fp32",
        })
        for has_ent in (False, True):
            specs.append({
                "kernel": _dlogits_kernel, "variant": "logp+entropy" if has_ent else "logp", "dtype": dtype,
                "signature": {**inputs, **{name: "*fp32" for name in ("lse_ptr", "entropy_ptr", "g_logp_ptr",
                                                                       "g_ent_ptr")},
                              "dz_ptr": f"*{dtype}", **scalars, "v_begin": "i32", "slice_width": "i32", **strides,
                              "stride_dzn": "i32", "inv_temperature": "fp32"},
                "constexprs": {"BLOCK_N": dlg.block_n, "BLOCK_V": dlg.block_v, "BLOCK_H": dlg.block_h,
                               "GROUP": GROUP_ROWS, "HAS_ENT_GRAD": has_ent, "PRECISION": precision},
                "aligned": ("H", "stride_hn", "stride_wv", "stride_dzn"), "num_warps": dlg.num_warps,
                "num_stages": dlg.num_stages, "expect_wgmma": dtype != "fp32",
            })
    return specs
