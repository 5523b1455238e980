"""Per-kernel and per-path times of the fused loss at Qwen shapes, for bench/gpu_run.py and the roofline's fit.

Each kernel of both paths is launched on its own at the real shape and timed with CUDA events (the median of
`triton.testing.do_bench`, L2 flushed between runs), next to the `Launch` bench/roofline_paths.py models it with,
so `bench.roofline_model.fit` can calibrate the model from the records. Paths are timed end to end through
`dsrl_fast.loss.policy_loss` (forward + backward) against the same-run cuBLAS GEMM of the logits' shape. On CPU (the
dry run: Triton interpreter, tiny shapes) the same code runs with `time.perf_counter`; its times mean nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import roofline_paths as paths
from bench.roofline_model import Launch
from bench.standin_lm import zipf_logits
from dsrl_fast import PolicyLossConfig, policy_loss
from dsrl_fast.kernels import linear_logprobs as kernels
from dsrl_fast.kernels import logits_rows, sparse_grads
from dsrl_fast.ops import tile_skip
from dsrl_fast.ops.gemm import matmul_into

LOSS = PolicyLossConfig()
# The stand-in for peaked logits on the GPU (no model can be loaded there): p ∝ rank^-2 with a context term of std 1
# (entropy ~1.7 nats, top-1 ~0.55; bench/standin_lm.py).
STANDIN = {"context_std": 1.0, "exponent": 2.0}


def seconds(fn: Callable[[], object], device: torch.device, rep_ms: int = 60) -> float:
    """Median seconds of fn() (CUDA events via do_bench on GPU; one perf_counter call on CPU)."""
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _record(launch: Launch, measured: float) -> dict[str, Any]:
    return {"launch": dataclasses.asdict(dataclasses.replace(launch, count=1)), "seconds": measured}


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, peaked: bool = False,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if peaked:
        rows = zipf_logits(n, h, v, seed=seed, device=device, **STANDIN)
        return rows.hidden.to(dtype), rows.weight.to(dtype), rows.labels
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (4.0 / h**0.5)).to(dtype)
    return hidden, weight, torch.randint(0, v, (n,), device=device, generator=gen)


def kernel_records(n: int, h: int, v: int, *, dtype: torch.dtype, device: torch.device,
                   chunk_rows: int) -> list[dict[str, Any]]:
    """Every kernel of both paths at (n, h, v), one launch each: [{"launch": Launch fields, "seconds": s}]."""
    hidden, weight, labels = _inputs(n, h, v, dtype, device)
    records = []
    cfg = kernels.default_config("forward", hidden)
    tile_lse = torch.empty((-(-v // cfg.block_v), n), device=device)
    records.append(_record(paths.forward_kernel(n, h, v, skipping=True), seconds(
        lambda: kernels.forward_partials(hidden, weight, labels, 1.0, True, cfg, tile_lse=tile_lse), device)))
    lse = kernels.combine_partials(kernels.forward_partials(hidden, weight, labels, 1.0, False))[0]
    g = torch.randn(n, device=device)
    width = min(kernels.slice_width(v, hidden.element_size(), h), v)
    dz = torch.empty((n, width), dtype=dtype, device=device)
    records.append(_record(paths.dz_kernel(n, h, width), seconds(
        lambda: kernels.dlogits(hidden, weight, labels, lse, None, g, None, 1.0, dz), device)))
    d_hidden = torch.zeros((n, h), device=device)
    records.append(_record(paths.dhidden_gemm(n, h, width), seconds(
        lambda: matmul_into(d_hidden, dz, weight[:width], accumulate=True), device)))
    d_weight = torch.empty_like(weight)
    records.append(_record(paths.dweight_gemm(n, h, width), seconds(
        lambda: matmul_into(d_weight[:width], dz.T, hidden, accumulate=False), device)))
    records += _sparse_records(hidden, weight, labels, lse, g, width, d_hidden, d_weight)
    records += _gif_records(hidden[:chunk_rows], weight, labels[:chunk_rows], g[:chunk_rows], d_weight)
    return records


def _sparse_records(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    g: torch.Tensor, width: int, d_hidden: torch.Tensor,
                    d_weight: torch.Tensor) -> list[dict[str, Any]]:
    """The three sparse kernels on the first slice of a plan keeping every other (row block, tile) pair."""
    n, h = hidden.shape
    device = hidden.device
    cfg = kernels.default_config("dlogits", hidden)
    row_blocks, n_tiles = -(-n // cfg.block_n), -(-weight.shape[0] // cfg.block_v)
    keep = (torch.arange(row_blocks, device=device)[:, None] + torch.arange(n_tiles, device=device)[None, :]) % 2 == 0
    plan = tile_skip.plan(keep, row_blocks * max(1, width // cfg.block_v))
    span = plan.spans[0]
    count, tiles_in_slice = span.pair_end - span.pair_begin, span.tile_end - span.tile_begin
    packed = torch.empty((count, cfg.block_n, cfg.block_v), dtype=hidden.dtype, device=device)
    pairs = slice(span.pair_begin, span.pair_end)
    row_ptr = plan.row_ptr[span.row_ptr_begin:span.row_ptr_begin + row_blocks + 1]
    col_ptr = plan.col_ptr[span.col_ptr_begin:span.col_ptr_begin + tiles_in_slice + 1]
    runs = [
        lambda: kernels.dlogits(hidden, weight, labels, lse, None, g, None, 1.0, packed, pairs=plan.pairs[pairs]),
        lambda: sparse_grads.sparse_dhidden(packed, weight, plan.tiles[pairs], row_ptr, d_hidden),
        lambda: sparse_grads.sparse_dweight(packed, hidden, plan.slots[pairs], plan.row_blocks[pairs], col_ptr,
                                            d_weight, span.tile_begin),
    ]
    runs[0]()
    return [_record(launch, seconds(run, device))
            for launch, run in zip(paths.sparse_kernels(n, h, count, tiles_in_slice), runs)]


def _gif_records(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
                 d_weight: torch.Tensor) -> list[dict[str, Any]]:
    """One gradient-in-forward chunk: the logits GEMM, both row kernels (dz in place), both gradient GEMMs."""
    rows, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    z = torch.empty((rows, v), device=device)
    matmul_into(z, hidden, weight.T, accumulate=False)
    lse, _, ent = logits_rows.row_stats(z, labels, 1.0, True)
    dz = z.view(hidden.dtype)[:, :v] if hidden.dtype != torch.float32 else z
    d_hidden = torch.empty_like(hidden)
    acc = torch.zeros((v, h), device=device)
    launches = {launch.name: launch for launch in paths.gif_chunk(rows, h, v)}
    runs = {
        f"cuBLAS fp32 logits ({rows} rows)": lambda: matmul_into(z, hidden, weight.T, accumulate=False),
        "row statistics kernel": lambda: logits_rows.row_stats(z, labels, 1.0, True),
        "row gradient kernel (dz over the logits)": lambda: logits_rows.row_grad(z, labels, lse, None, g, None, 1.0,
                                                                                  dz),
        "cuBLAS d_hidden = dz·W": lambda: matmul_into(d_hidden, dz, weight, accumulate=False),
        "cuBLAS d_weight += dzᵀ·h": lambda: matmul_into(acc, dz.T, hidden, accumulate=True),
    }
    return [_record(launches[name], seconds(run, device)) for name, run in runs.items()]


def path_records(n: int, h: int, v: int, *, dtype: torch.dtype, device: torch.device,
                 workspace_bytes: int) -> list[dict[str, Any]]:
    """Forward + backward of both paths through policy_loss, on flat random logits (the dense backward) and on the
    peaked stand-in (tile skipping), with the same-run cuBLAS GEMM of the logits' shape: ms, share of the 6·N·H·V
    cuBLAS rate, kept share, and peak memory above the inputs split into output gradients and workspace."""
    a = torch.randn(n, h, device=device, dtype=dtype)
    b = torch.randn(h, v, device=device, dtype=dtype)
    gemm = seconds(lambda: torch.mm(a, b), device)
    del a, b
    out = []
    for inputs in ("random", "peaked stand-in"):
        hidden, weight, labels = _inputs(n, h, v, dtype, device, peaked=inputs != "random")
        hidden.requires_grad_()
        weight.requires_grad_()
        advantages = torch.where(torch.arange(n, device=device) // 256 % 2 == 0, 1.0, -1.0)
        for impl in ("triton", "grad_in_forward"):
            def step() -> None:
                hidden.grad = weight.grad = None
                policy_loss(hidden, weight, labels, advantages, config=LOSS, impl=impl,
                            workspace_bytes=workspace_bytes).loss.backward()

            step()
            elapsed = seconds(step, device, rep_ms=300)
            record = {"inputs": inputs, "impl": impl, "N": n, "H": h, "V": v, "ms": elapsed * 1e3,
                      "gemm_ms": gemm * 1e3, "share_of_6nhv_rate": 3.0 * gemm / elapsed}
            record.update(_memory(step, hidden, weight, device))
            out.append(record)
        del hidden, weight
    return out


def _memory(step: Callable[[], None], hidden: torch.Tensor, weight: torch.Tensor,
            device: torch.device) -> dict[str, Any]:
    """Peak bytes above the inputs during one step, the output gradients' bytes, and the rest (the workspace)."""
    if device.type != "cuda":
        return {"peak_bytes": None, "output_grad_bytes": None, "workspace_bytes": None}
    hidden.grad = weight.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    grads = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    return {"peak_bytes": peak, "output_grad_bytes": grads, "workspace_bytes": peak - grads}


def stand_in_kept_share(n: int, h: int, v: int, *, device: torch.device, dtype: torch.dtype) -> float:
    """The share of (row block, vocabulary tile) pairs the backward keeps on the peaked stand-in (all rows with a
    gradient), from the forward kernel's tile statistics as the op computes them."""
    hidden, weight, labels = _inputs(n, h, v, dtype, device, peaked=True)
    fwd = kernels.default_config("forward", hidden)
    dlg = kernels.default_config("dlogits", hidden)
    tile_lse = torch.empty((-(-v // fwd.block_v), n), device=device)
    lse = kernels.combine_partials(kernels.forward_partials(hidden, weight, labels, 1.0, False, fwd,
                                                            tile_lse=tile_lse))[0]
    masses = tile_skip.tile_masses(tile_lse, lse, labels, fwd.block_v)
    keep = tile_skip.kept_pairs(masses, None, dlg.block_n, dlg.block_v, fwd.block_v, v, tile_skip.DEFAULT_THRESHOLD)
    return float(keep.float().mean())
