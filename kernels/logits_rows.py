"""Row kernels of the gradient-in-forward path: statistics and the logits gradient of a chunk of fp32 logits.

The path (dsrl_fast/ops/grad_in_forward.py) computes a chunk of C rows of logits in fp32 with cuBLAS, reads them
twice here and hands a 16-bit d_logits to cuBLAS for d_hidden and d_weight: 6·C·H·V FLOPs on tensor cores, and
C·V·(4 + 4 + 2) bytes of row-kernel traffic (read for the statistics, read again and write dz). Both kernels are
bandwidth-bound streams (one row per program, BLOCK_V columns per step). Against the GEMMs of the same rows their
time is 10·V bytes / (6·H·V FLOPs) = 10·R / (6·H·B) with R the cuBLAS rate (~790 TFLOP/s on H100 and H200) and B
the achievable HBM bandwidth (~0.9 × 3.35 TB/s on H100 SXM, 0.9 × 4.8 TB/s on H200): +17% / +12% of the GEMM time
at H = 2560 (Qwen3-4B, H100 / H200) and +11% / +7.5% at H = 4096 (Qwen3-8B); bench/roofline.py models it per shape.

dz is written over the logits it was computed from: row r of a 16-bit dz occupies the first half of the bytes of
row r of the fp32 buffer, so the workspace is the fp32 chunk alone (C·V·4 bytes). Step k of a row reads fp32
columns [kB, (k+1)B) (B = BLOCK_V) and its 16-bit stores land in the bytes of fp32 columns [kB/2, (k+1)B/2), which
step ⌊k/2⌋ read, possibly in another warp of the program. Warps run unordered, so a store is safe only once every
warp has passed that read: the program waits at a CTA barrier (bar.sync) after the loads of steps 0, 1, 2, 4, 8, …
The last barrier before step k's stores is at step 2^⌊log2 k⌋ > k/2 (step 0 for k = 0), so every warp has read
step ⌊k/2⌋ by then, whatever the warp schedule; a row of V = 151,936 at B = 2048 waits 8 times in 75 steps.
Writing fp32 dz over fp32 logits needs no barrier: each element is stored by the thread that loaded it.
bench/compile_report.py counts the barriers in the PTX, and bench/gpu_run.py runs the in-place kernel against a
separate output bitwise on many rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GPU_BLOCK_V = 2048
GPU_NUM_WARPS = 8
INTERPRETER_BLOCK_V = 1024


@triton.jit
def _row_stats_kernel(z_ptr, labels_ptr, lse_ptr, label_logit_ptr, entropy_ptr, V, stride_zn, inv_temperature,
                      BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Per row of z / temperature: logsumexp, the label's logit and (optionally) the entropy."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_zn
    offs = tl.arange(0, BLOCK_V)
    # Lanes start at a finite floor (no inf - inf); a lane that never sees a column keeps it and weighs 0 below.
    run_max = tl.full((BLOCK_V,), -3.0e38, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    run_sumz = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = (v0 + offs) < V
        z = tl.where(ok, tl.load(base + v0 + offs, mask=ok, other=0.0) * inv_temperature, -3.0e38)
        new_max = tl.where(ok, tl.maximum(run_max, z), run_max)
        rescale = tl.exp(run_max - new_max)
        p = tl.where(ok, tl.exp(z - new_max), 0.0)
        run_sum = run_sum * rescale + p
        if WITH_ENTROPY:
            run_sumz = run_sumz * rescale + p * z
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.exp(run_max - row_max)
    total = tl.sum(run_sum * lane_scale, axis=0)
    lse = row_max + tl.log(total)
    tl.store(lse_ptr + row, lse)
    label = tl.load(labels_ptr + row)
    tl.store(label_logit_ptr + row, tl.load(base + label) * inv_temperature)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, lse - tl.sum(run_sumz * lane_scale, axis=0) / total)


@triton.jit
def _row_grad_kernel(z_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dz_ptr, V, stride_zn,
                     stride_dzn, inv_temperature, BLOCK_V: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
                     NARROW_IN_PLACE: tl.constexpr):
    """dz = d loss / d z for one row, from z, the row's statistics and the loss gradient w.r.t. logp/entropy.

    NARROW_IN_PLACE: dz is narrower than z and overwrites z's row (see the module docstring for the barriers)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    if HAS_ENT_GRAD:
        g_ent = tl.load(g_ent_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        log_p = tl.load(z_ptr + row * stride_zn + cols, mask=ok, other=0.0) * inv_temperature - lse
        if NARROW_IN_PLACE:
            step = v0 // BLOCK_V
            if (step & (step - 1)) == 0:
                tl.debug_barrier()
        p = tl.exp(log_p)
        dz = g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
        if HAS_ENT_GRAD:
            dz -= g_ent * p * (log_p + entropy)
        tl.store(dz_ptr + row * stride_dzn + cols, (dz * inv_temperature).to(dz_ptr.dtype.element_ty), mask=ok)


def _block_v(z: torch.Tensor) -> int:
    return INTERPRETER_BLOCK_V if z.device.type == "cpu" else GPU_BLOCK_V


def row_stats(z: torch.Tensor, labels: torch.Tensor, inv_temperature: float, with_entropy: bool,
              block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, label_logit, entropy or None), each (C,) fp32, of z / temperature. z: (C, V) fp32, unit column
    stride; labels: (C,) int64 contiguous. block_v: columns per step (None: the vetted default)."""
    c, v = z.shape
    assert z.dtype == torch.float32 and z.stride(1) == 1 and labels.is_contiguous() and c > 0
    out = torch.empty((3, c), dtype=torch.float32, device=z.device)
    _row_stats_kernel[(c,)](z, labels, out[0], out[1], out[2], v, z.stride(0), inv_temperature,
                            BLOCK_V=block_v or _block_v(z), WITH_ENTROPY=with_entropy, num_warps=GPU_NUM_WARPS)
    return out[0], out[1], out[2] if with_entropy else None


def row_grad(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
             grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, inv_temperature: float,
             out: torch.Tensor, block_v: int | None = None) -> None:
    """Write d loss / d z into `out` (C, V) fp32/fp16/bf16, unit column stride. `out` is either its own memory or
    the in-place view of the module docstring (same first byte and byte row stride as z, element size <= 4).
    lse, grad_logprobs (and entropy, grad_entropy together): (C,) fp32."""
    c, v = z.shape
    assert out.shape == z.shape and out.stride(1) == 1 and grad_logprobs.dtype == torch.float32
    assert (entropy is None) == (grad_entropy is None)
    in_place = out.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    if in_place:
        assert out.data_ptr() == z.data_ptr() and out.stride(0) * out.element_size() == z.stride(0) * 4
        assert out.element_size() <= z.element_size()
    block = block_v or _block_v(z)
    assert block % 2 == 0
    has_ent = grad_entropy is not None
    _row_grad_kernel[(c,)](z, labels, lse, entropy if has_ent else lse, grad_logprobs,
                           grad_entropy if has_ent else grad_logprobs, out, v, z.stride(0), out.stride(0),
                           inv_temperature, BLOCK_V=block, HAS_ENT_GRAD=has_ent,
                           NARROW_IN_PLACE=in_place and out.element_size() < z.element_size(),
                           num_warps=GPU_NUM_WARPS)


def compile_specs() -> list[dict[str, object]]:
    """Compile entries for bench/compile_report.py (see kernels/linear_logprobs.py for the keys). The row kernels
    have no GEMM: they stream fp32 logits, so no wgmma is expected; `dtype` is the dz output dtype."""
    specs: list[dict[str, object]] = []
    for dtype in ("bf16", "fp16", "fp32"):
        specs.append({
            "kernel": _row_stats_kernel, "variant": "entropy", "dtype": dtype,
            "signature": {"z_ptr": "*fp32", "labels_ptr": "*i64", "lse_ptr": "*fp32", "label_logit_ptr": "*fp32",
                          "entropy_ptr": "*fp32", "V": "i32", "stride_zn": "i32", "inv_temperature": "fp32"},
            "constexprs": {"BLOCK_V": GPU_BLOCK_V, "WITH_ENTROPY": True},
            "aligned": ("stride_zn",), "num_warps": GPU_NUM_WARPS, "num_stages": 1, "expect_wgmma": False,
        })
        for has_ent in (False, True):
            # The path writes 16-bit dz over the fp32 logits (barriers); fp32 dz over them needs none.
            in_place = dtype != "fp32"
            specs.append({
                "kernel": _row_grad_kernel,
                "variant": ("logp+entropy" if has_ent else "logp") + (" in-place" if in_place else ""),
                "dtype": dtype,
                "signature": {"z_ptr": "*fp32", "labels_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                              "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dz_ptr": f"*{dtype}", "V": "i32",
                              "stride_zn": "i32", "stride_dzn": "i32", "inv_temperature": "fp32"},
                "constexprs": {"BLOCK_V": GPU_BLOCK_V, "HAS_ENT_GRAD": has_ent, "NARROW_IN_PLACE": in_place},
                "aligned": ("stride_zn", "stride_dzn"), "num_warps": GPU_NUM_WARPS, "num_stages": 1,
                "expect_wgmma": False,
            })
    return specs
