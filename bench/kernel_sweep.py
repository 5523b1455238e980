"""Config sweeps of the fused-loss kernels on a GPU (bench/gpu_run.py's last section): the vetted choices' evidence.

- forward: each config of kernels/fused_tiles.FORWARD_CANDIDATES at one N per bucket of FORWARD_BUCKETS (Qwen3-4B
  width), to fill the bucket table with the fastest;
- backward slices: the dense backward (dz kernel + two cuBLAS GEMMs, one slice of each width) per column at
  Qwen3-8B, to check the slice width `slice_width` picks from the model;
- row kernels: the gradient-in-forward row kernels at a few BLOCK_V.

Records are dicts {"sweep", "config", "shape", "seconds" or "error"}; seconds per launch (per slice column for the
slice sweep). On CPU (the dry run) the shapes are tiny and one config each: the code runs, the times mean nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from bench.gpu_kernels import seconds
from dsrl_fast.kernels import fused_tiles
from dsrl_fast.kernels import linear_logprobs as kernels
from dsrl_fast.kernels import logits_rows
from dsrl_fast.ops.gemm import matmul_into

FORWARD_NS = (4096, 16384, 32768)
SLICE_WIDTHS = (896, 1280, 1664, 2048, 2944)
ROW_BLOCKS = (1024, 2048, 4096)


def _try(sweep: str, config: str, shape: dict[str, int], fn: Callable[[], float]) -> dict[str, Any]:
    try:
        return {"sweep": sweep, "config": config, "shape": shape, "seconds": fn()}
    except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is a result, not a crash
        return {"sweep": sweep, "config": config, "shape": shape, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def sweep(device: torch.device, *, budget_s: float) -> list[dict[str, Any]]:
    """All three sweeps within budget_s seconds (configs past it are recorded as skipped)."""
    dry = device.type == "cpu"
    dtype = torch.float16 if dry else torch.bfloat16
    start = time.monotonic()
    records: list[dict[str, Any]] = []

    def over() -> bool:
        return time.monotonic() - start > budget_s

    gen = torch.Generator(device=device).manual_seed(0)
    h, v = (64, 1007) if dry else (2560, 151936)
    weight = (torch.randn(v, h, device=device, generator=gen) * (4.0 / h**0.5)).to(dtype)
    for n in ((64,) if dry else FORWARD_NS):
        hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
        labels = torch.randint(0, v, (n,), device=device, generator=gen)
        for cfg in ((kernels.INTERPRETER_CONFIG,) if dry else fused_tiles.FORWARD_CANDIDATES):
            shape = {"N": n, "H": h, "V": v}
            if over():
                records.append({"sweep": "forward", "config": str(tuple(cfg)), "shape": shape,
                                "error": "skipped: sweep time budget spent"})
                continue
            records.append(_try("forward", str(tuple(cfg)), shape, lambda cfg=cfg, hidden=hidden, labels=labels:
                                seconds(lambda: kernels.forward_partials(hidden, weight, labels, 1.0, True, cfg),
                                        device)))
    records += _slice_sweep(device, dtype, dry, over)
    records += _row_sweep(device, dry, over)
    return records


def _slice_sweep(device: torch.device, dtype: torch.dtype, dry: bool,
                 over: Callable[[], bool]) -> list[dict[str, Any]]:
    n, h, v = (64, 64, 1007) if dry else (16384, 4096, 151936)
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (4.0 / h**0.5)).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    lse = kernels.combine_partials(kernels.forward_partials(hidden, weight, labels, 1.0, False))[0]
    g = torch.randn(n, device=device)
    d_hidden = torch.zeros((n, h), device=device)
    d_weight = torch.empty_like(weight)
    records = []
    for width in ((128,) if dry else SLICE_WIDTHS):
        shape = {"N": n, "H": h, "V": v}
        if over():
            records.append({"sweep": "slice", "config": f"width={width}", "shape": shape,
                            "error": "skipped: sweep time budget spent"})
            continue
        dz = torch.empty((n, width), dtype=dtype, device=device)

        def one_slice(dz: torch.Tensor = dz, width: int = width) -> None:
            kernels.dlogits(hidden, weight, labels, lse, None, g, None, 1.0, dz)
            matmul_into(d_hidden, dz, weight[:width], accumulate=True)
            matmul_into(d_weight[:width], dz.T, hidden, accumulate=False)

        records.append(_try("slice", f"width={width}", shape,
                            lambda one_slice=one_slice, width=width: seconds(one_slice, device) / width))
    return records


def _row_sweep(device: torch.device, dry: bool, over: Callable[[], bool]) -> list[dict[str, Any]]:
    rows, v = (8, 1007) if dry else (1766, 151936)
    gen = torch.Generator(device=device).manual_seed(2)
    z = torch.randn(rows, v, device=device, generator=gen) * 3.0
    labels = torch.randint(0, v, (rows,), device=device, generator=gen)
    g = torch.randn(rows, device=device)
    out = torch.empty(rows, v, dtype=torch.float16 if dry else torch.bfloat16, device=device)
    records = []
    for block in ((logits_rows.INTERPRETER_BLOCK_V,) if dry else ROW_BLOCKS):
        shape = {"rows": rows, "V": v}
        if over():
            records.append({"sweep": "rows", "config": f"BLOCK_V={block}", "shape": shape,
                            "error": "skipped: sweep time budget spent"})
            continue
        lse = logits_rows.row_stats(z, labels, 1.0, True, block_v=block)[0]
        records.append(_try("rows", f"row_stats BLOCK_V={block}", shape, lambda b=block: seconds(
            lambda: logits_rows.row_stats(z, labels, 1.0, True, block_v=b), device)))
        records.append(_try("rows", f"row_grad BLOCK_V={block}", shape, lambda b=block, lse=lse: seconds(
            lambda: logits_rows.row_grad(z, labels, lse, None, g, None, 1.0, out, block_v=b), device)))
    return records
