"""GEMMs with an output dtype chosen apart from the operands' (cuBLAS on CUDA, upcast BLAS elsewhere)."""

from __future__ import annotations

import torch


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """out (+)= a @ b with fp32 accumulation. a: (M, K), b: (K, P) of one dtype; out: (M, P), fp32 or a's dtype.

    On CUDA, 16-bit operands with an fp32 `out` go through cuBLAS with an fp32 C matrix (`out_dtype`), so no 16-bit
    rounding happens between accumulations. Off CUDA the operands are upcast (the CPU path is a reference).
    """
    assert a.dtype == b.dtype and out.dtype in (torch.float32, a.dtype)
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if a.device.type == "cuda":
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    if accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
