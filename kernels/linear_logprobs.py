"""Token log-probs and entropy straight from hidden states and the LM-head weight, never storing the logits.

Work accounting (N tokens, hidden H, vocabulary V): the forward is one logits GEMM (2·N·H·V) with an online
logsumexp; the backward recomputes each logits tile (2·N·H·V) and feeds both gradient GEMMs (4·N·H·V), so dense work
is 8·N·H·V against the 6·N·H·V of a method that keeps logits. We take that path because a row's probabilities are
final only after its logsumexp has seen the whole vocabulary, and keeping even a chunk of fp32 logits costs
chunk × V × 4 bytes (600 MB for 1k tokens of a 152k vocabulary). The saving comes from skipping work instead: a
backward tile whose rows all have zero gradient (prompt tokens, NSR-filtered samples, zero-advantage groups) returns
before its first GEMM.

Forward: grid (row blocks, vocabulary splits); each program streams its share of the vocabulary and writes partial
statistics (running max, Σexp, Σexp·z, label logit) that `combine_partials` merges in O(splits × N).
Backward: grid (row blocks × vocabulary blocks), grouped so neighbouring programs share a row block in L2; each
program rebuilds its logits tile, forms dz and adds dz·W into d_hidden and dzᵀ·h into d_weight with fp32 atomics.
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
BACKWARD_CONFIG = KernelConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3)
FP32_FORWARD_CONFIG = KernelConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2)
FP32_BACKWARD_CONFIG = KernelConfig(block_n=32, block_v=128, block_h=32, num_warps=8, num_stages=3)
INTERPRETER_CONFIG = KernelConfig(block_n=64, block_v=256, block_h=128, num_warps=1, num_stages=1)
GROUP_ROWS = 8


class Partials(NamedTuple):
    """Per-split statistics of the forward pass, each (splits, N) fp32."""

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_z: torch.Tensor
    label_logit: torch.Tensor


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of hidden @ weight.T / temperature; vocabulary tail = -inf."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_ok = offs_n < N
    col_ok = offs_v < V
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
                    N, V, H, stride_hn, stride_wv, inv_temperature, tiles_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
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
def _backward_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dh_ptr, dw_ptr,
                     N, V, H, stride_hn, stride_wv, inv_temperature,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                     HAS_ENT_GRAD: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                     PRECISION: tl.constexpr):
    # Grouped launch order: GROUP consecutive row blocks sweep the vocabulary together, so their hidden rows and
    # the current weight tiles stay in L2.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_vocab_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * n_vocab_blocks
    first_row_block = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP)
    pid_n = first_row_block + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    g_logp = tl.load(g_logp_ptr + offs_n, mask=row_ok, other=0.0)
    active = g_logp != 0.0
    if HAS_ENT_GRAD:
        g_ent = tl.load(g_ent_ptr + offs_n, mask=row_ok, other=0.0)
        active = active | (g_ent != 0.0)
    if tl.max(active.to(tl.int32), axis=0) == 0:
        return

    z = _logits_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_temperature,
                     BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=-1)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    # d logp_label / dz = onehot - p ; d entropy / dz = -p · (log p + entropy)
    dz = g_logp[:, None] * (tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        entropy = tl.load(entropy_ptr + offs_n, mask=row_ok, other=0.0)
        dz -= g_ent[:, None] * p * (tl.where(p > 0, log_p, 0.0) + entropy[:, None])
    dz = tl.where(row_ok[:, None] & (offs_v < V)[None, :], dz * inv_temperature, 0.0)
    dz_op = dz.to(h_ptr.dtype.element_ty)

    offs_h = tl.arange(0, BLOCK_H)
    col_ok = offs_v < V
    for h0 in range(0, H, BLOCK_H):
        h_ok = (h0 + offs_h) < H
        if COMPUTE_DH:
            w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_wv + (h0 + offs_h)[None, :],
                        mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            dh = tl.dot(dz_op, w, input_precision=PRECISION)
            tl.atomic_add(dh_ptr + offs_n[:, None].to(tl.int64) * H + (h0 + offs_h)[None, :], dh,
                          mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")
        if COMPUTE_DW:
            h = tl.load(h_ptr + offs_n[:, None].to(tl.int64) * stride_hn + (h0 + offs_h)[None, :],
                        mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            dw = tl.dot(tl.trans(dz_op), h, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + offs_v[:, None].to(tl.int64) * H + (h0 + offs_h)[None, :], dw,
                          mask=col_ok[:, None] & h_ok[None, :], sem="relaxed")


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 semantics (no silent TF32); 16-bit operands use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def gpu_config(kind: str, dtype: torch.dtype) -> KernelConfig:
    """The vetted GPU config of `kind` ("forward" or "backward") for operands of `dtype`."""
    assert kind in ("forward", "backward")
    if dtype == torch.float32:
        return FP32_FORWARD_CONFIG if kind == "forward" else FP32_BACKWARD_CONFIG
    return FORWARD_CONFIG if kind == "forward" else BACKWARD_CONFIG


def default_config(kind: str, hidden: torch.Tensor) -> KernelConfig:
    """The vetted config of `kind` ("forward" or "backward") for tensors like `hidden` (device and dtype)."""
    return INTERPRETER_CONFIG if _interpreting(hidden) else gpu_config(kind, hidden.dtype)


def _num_splits(n_row_blocks: int, n_vocab_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(n_vocab_tiles, 2)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_vocab_tiles, triton.cdiv(target, n_row_blocks)))


def forward_partials(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
                     with_entropy: bool, config: KernelConfig | None = None,
                     num_splits: int | None = None) -> Partials:
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
    splits = num_splits or _num_splits(n_row_blocks, n_vocab_tiles, hidden.device)
    tiles_per_split = triton.cdiv(n_vocab_tiles, splits)
    splits = triton.cdiv(n_vocab_tiles, tiles_per_split)
    stats = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    _forward_kernel[(n_row_blocks, splits)](
        hidden, weight, labels, stats[0], stats[1], stats[2], stats[3],
        n, v, h_dim, hidden.stride(0), weight.stride(0), inv_temperature, tiles_per_split,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, WITH_ENTROPY=with_entropy,
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


def backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             entropy: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
             inv_temperature: float, compute_dh: bool, compute_dw: bool,
             config: KernelConfig | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel.

    lse, entropy, grad_logprobs, grad_entropy: (N,) fp32 contiguous (entropy/grad_entropy None when the entropy has
    no gradient). Returns (d_hidden (N, H) fp32 or None, d_weight (V, H) fp32 or None).
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    assert grad_logprobs.dtype == torch.float32 and grad_logprobs.is_contiguous()
    assert (entropy is None) == (grad_entropy is None)
    cfg = config or default_config("backward", hidden)
    d_hidden = torch.zeros((n, h_dim), dtype=torch.float32, device=hidden.device) if compute_dh else None
    d_weight = torch.zeros((v, h_dim), dtype=torch.float32, device=hidden.device) if compute_dw else None
    if not (compute_dh or compute_dw):
        return d_hidden, d_weight
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
    has_ent = grad_entropy is not None
    _backward_kernel[grid](
        hidden, weight, labels, lse, entropy if has_ent else lse, grad_logprobs,
        grad_entropy if has_ent else grad_logprobs,
        d_hidden if compute_dh else grad_logprobs, d_weight if compute_dw else grad_logprobs,
        n, v, h_dim, hidden.stride(0), weight.stride(0), inv_temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=GROUP_ROWS,
        HAS_ENT_GRAD=has_ent, COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw,
        PRECISION=_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return d_hidden, d_weight


def compile_specs() -> list[dict[str, object]]:
    """Ahead-of-time compile entries for bench/compile_report.py: each kernel variant × dtype at its GPU default.

    Each entry: kernel (the @triton.jit function), variant (str), dtype ("bf16" | "fp16" | "fp32"), signature
    ({runtime argument: Triton type such as "*bf16", "i32", "fp32"}), constexprs ({constexpr argument: value}),
    aligned (integer arguments assumed multiples of 16, as Qwen-sized H and row strides are; pointers always are),
    num_warps, num_stages, expect_wgmma (16-bit operands must reach Hopper's wgmma tensor-core instructions).
    """
    specs: list[dict[str, object]] = []
    scalars = {"N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "inv_temperature": "fp32"}
    aligned = ("H", "stride_hn", "stride_wv")
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype, torch_dtype in torch_dtypes.items():
        precision = _precision(torch_dtype)
        inputs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "labels_ptr": "*i64"}
        fwd, bwd = gpu_config("forward", torch_dtype), gpu_config("backward", torch_dtype)
        specs.append({
            "kernel": _forward_kernel, "variant": "entropy", "dtype": dtype,
            "signature": {**inputs, **{name: "*fp32" for name in ("max_ptr", "sum_ptr", "sumz_ptr", "label_ptr")},
                          **scalars, "tiles_per_split": "i32"},
            "constexprs": {"BLOCK_N": fwd.block_n, "BLOCK_V": fwd.block_v, "BLOCK_H": fwd.block_h,
                           "WITH_ENTROPY": True, "PRECISION": precision},
            "aligned": aligned, "num_warps": fwd.num_warps, "num_stages": fwd.num_stages,
            "expect_wgmma": dtype != "fp32",
        })
        for has_ent in (False, True):
            specs.append({
                "kernel": _backward_kernel, "variant": "dh+dw+entropy" if has_ent else "dh+dw", "dtype": dtype,
                "signature": {**inputs, **{name: "*fp32" for name in ("lse_ptr", "entropy_ptr", "g_logp_ptr",
                                                                       "g_ent_ptr", "dh_ptr", "dw_ptr")},
                              **scalars},
                "constexprs": {"BLOCK_N": bwd.block_n, "BLOCK_V": bwd.block_v, "BLOCK_H": bwd.block_h,
                               "GROUP": GROUP_ROWS, "HAS_ENT_GRAD": has_ent, "COMPUTE_DH": True, "COMPUTE_DW": True,
                               "PRECISION": precision},
                "aligned": aligned, "num_warps": bwd.num_warps, "num_stages": bwd.num_stages,
                "expect_wgmma": dtype != "fp32",
            })
    return specs
