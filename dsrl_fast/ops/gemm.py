"""GEMMs with an output dtype chosen apart from the operands' (cuBLAS on CUDA, upcast BLAS elsewhere)."""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["GEMM_STRATEGIES", "gemm_strategy", "matmul_into"]

# How `out (+)= a @ b` runs with 16-bit a, b and an fp32 out:
#   "addmm_out_dtype": one cuBLAS call with an fp32 C matrix (torch >= 2.10 accepts an fp32 `self` in addmm.dtype_out);
#   "mm_out_dtype": one cuBLAS call writing fp32 (no accumulation asked; torch >= 2.8);
#   "mm_out_dtype_add": the product into an fp32 temporary of out's shape, then added (torch 2.8 and 2.9);
#   "upcast": operands copied to fp32 first (off CUDA, and CUDA torch < 2.8).
GEMM_STRATEGIES = ("addmm_out_dtype", "mm_out_dtype", "mm_out_dtype_add", "upcast")


@functools.cache
def _cuda_out_dtype_support(device: torch.device) -> tuple[bool, bool]:
    """(mm, addmm) take out_dtype=fp32 with bf16 operands, an fp32 `out` and, for addmm, an fp32 `self`.

    Probed once per device on 1x1 tensors: the out_dtype overloads appeared in torch 2.8 and addmm's fp32 `self` in
    2.10 (older versions raise), and a version number cannot tell a nightly from a release.
    """
    a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    out = torch.zeros(1, 1, dtype=torch.float32, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        return False, False
    try:
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        return True, False
    return True, out.item() == 2.0


def gemm_strategy(device: torch.device, *, accumulate: bool) -> str:
    """Which of GEMM_STRATEGIES :func:`matmul_into` uses on `device` for 16-bit operands and an fp32 `out`; on CUDA
    a torch without the fast path says so once (a warning naming the version that has it)."""
    if device.type != "cuda":
        return "upcast"
    mm_ok, addmm_ok = _cuda_out_dtype_support(device)
    if not mm_ok:
        _warn_once(f"torch {torch.__version__} has no fp32-output cuBLAS GEMM for 16-bit operands: the fused loss "
                   "upcasts its GEMM operands to fp32 (TF32 off, several times slower); torch >= 2.10 runs it at "
                   "full speed")
        return "upcast"
    if not accumulate:
        return "mm_out_dtype"
    if not addmm_ok:
        _warn_once(f"torch {torch.__version__} cannot accumulate into an fp32 output in one cuBLAS call: the fused "
                   "loss adds each product through an extra fp32 temporary; torch >= 2.10 avoids it")
        return "mm_out_dtype_add"
    return "addmm_out_dtype"


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """out (+)= a @ b with fp32 accumulation. a: (M, K), b: (K, P) of one dtype; out: (M, P), fp32 or a's dtype.

    On CUDA, 16-bit operands with an fp32 `out` go through cuBLAS writing fp32 (`out_dtype`), so no 16-bit rounding
    happens between accumulations; torch versions without that path fall back as GEMM_STRATEGIES says. Off CUDA the
    operands are upcast (the CPU path is a reference).
    """
    assert a.dtype == b.dtype and out.dtype in (torch.float32, a.dtype)
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    strategy = gemm_strategy(a.device, accumulate=accumulate)
    if strategy == "addmm_out_dtype":
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    elif strategy == "mm_out_dtype":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif strategy == "mm_out_dtype_add":
        out.add_(torch.mm(a, b, out_dtype=out.dtype))
    elif accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
