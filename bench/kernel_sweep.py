"""Tile-config sweep of the fused-loss kernels and an L2 fp32 atomic-add throughput microbenchmark (for gpu_run).

Rows are JSON lines: {"kernel", "config", "shape", "ms" or "error"} and {"op", "bytes", "ms", "gb_per_s"}. On CPU
(dry run, Triton interpreter) the shapes are tiny and the times mean nothing: it only checks that the code runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl
from dsrl_fast.kernels import linear_logprobs as kl
from dsrl_fast.kernels import logits_rows as kr
from dsrl_fast.kernels.fused_tiles import FORWARD_CANDIDATES

GPU_SHAPE = (8192, 2560, 151936)
DRY_SHAPE = (64, 64, 1007)
FORWARD_SWEEP = list(FORWARD_CANDIDATES)
DLOGITS_SWEEP = [kl.DLOGITS_CONFIG, kl.KernelConfig(128, 256, 64, 8, 3), kl.KernelConfig(128, 128, 64, 8, 4),
                 kl.KernelConfig(64, 128, 64, 4, 3)]
ROW_BLOCKS = (1024, 2048, 4096)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=5, rep=30))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def sweep(path: Path, *, dry: bool, budget_s: float) -> int:
    """Time each config of FORWARD_SWEEP / DLOGITS_SWEEP / ROW_BLOCKS at one shape; stop at budget_s seconds."""
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    n, h, v = DRY_SHAPE if dry else GPU_SHAPE
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (4.0 / h**0.5)).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    lse = kl.combine_partials(kl.forward_partials(hidden, weight, labels, 1.0, True))[0]
    g = torch.randn(n, device=device, generator=gen)
    width = kl.slice_width(v, hidden.element_size(), h)
    dz = torch.empty((n, min(width, v)), dtype=dtype, device=device)
    cases: list[tuple[str, str, Callable[[], object]]] = []
    for cfg in ([kl.INTERPRETER_CONFIG] if dry else FORWARD_SWEEP):
        cases.append(("_forward_kernel", str(tuple(cfg)),
                      lambda cfg=cfg: kl.forward_partials(hidden, weight, labels, 1.0, True, cfg)))
    for cfg in ([kl.INTERPRETER_CONFIG] if dry else DLOGITS_SWEEP):
        cases.append(("_dlogits_kernel", str(tuple(cfg)),
                      lambda cfg=cfg: kl.dlogits(hidden, weight, labels, lse, None, g, None, 1.0, dz, config=cfg)))
    rows = min(n, 1024)
    z = torch.randn(rows, v, device=device, generator=gen)
    for block in ((kr.INTERPRETER_BLOCK_V,) if dry else ROW_BLOCKS):
        cases.append(("_row_stats_kernel", f"BLOCK_V={block}",
                      lambda b=block: kr.row_stats(z, labels[:rows].contiguous(), 1.0, True, block_v=b)))
        cases.append(("_row_grad_kernel", f"BLOCK_V={block}",
                      lambda b=block: kr.row_grad(z, labels[:rows].contiguous(), lse[:rows].contiguous(), None,
                                                  g[:rows].contiguous(), None, 1.0, torch.empty_like(z), block_v=b)))
    start = time.perf_counter()
    for kernel, config, fn in cases:
        if time.perf_counter() - start > budget_s:
            _write(path, [{"kernel": kernel, "config": config, "error": "skipped: sweep time budget spent"}])
            continue
        shape = {"N": n, "H": h, "V": v, "dtype": str(dtype).removeprefix("torch.")}
        try:
            _write(path, [{"kernel": kernel, "config": config, "shape": shape, "ms": _time_ms(fn, device)}])
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is a result, not a crash
            _write(path, [{"kernel": kernel, "config": config, "shape": shape,
                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"}])
    return 0


@triton.jit
def _scatter_kernel(x_ptr, out_ptr, n_out, BLOCK: tl.constexpr, ATOMIC: tl.constexpr):
    """Program p adds (or stores) BLOCK fp32 values at out[(p·BLOCK) mod n_out ...]: many programs hit the same
    L2-resident lines, as the old backward's dh/dW tiles did."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    vals = tl.load(x_ptr + offs)
    dst = out_ptr + (pid * BLOCK) % n_out + offs
    if ATOMIC:
        tl.atomic_add(dst, vals, sem="relaxed")
    else:
        tl.store(dst, vals)


def l2_atomics(path: Path, *, dry: bool) -> int:
    """fp32 atomic-add vs plain-store throughput into a 16 MiB (L2-resident) buffer, 1 GiB of updates on GPU."""
    device = torch.device("cpu" if dry else "cuda")
    block = 1024
    n_out = (1 << 12) if dry else (1 << 22)
    programs = 8 if dry else (1 << 18)
    x = torch.ones(block, device=device)
    out = torch.zeros(n_out, device=device)
    rows = []
    for atomic in (True, False):
        ms = _time_ms(lambda a=atomic: _scatter_kernel[(programs,)](x, out, n_out, BLOCK=block, ATOMIC=a,
                                                                    num_warps=4), device)
        nbytes = programs * block * 4
        rows.append({"op": "atomic_add_f32" if atomic else "store_f32", "bytes": nbytes, "buffer_bytes": n_out * 4,
                     "ms": ms, "gb_per_s": nbytes / (ms * 1e6)})
    _write(path, rows)
    return 0
