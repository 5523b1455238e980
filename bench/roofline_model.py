"""The roofline model of the fused policy loss: each kernel at its own achievable rate, waves and epilogues included.

Every kernel of a path is one `Launch`: its FLOPs and HBM bytes, and how the work maps on the GPU.

- Triton MMA kernels (the forward, dz and the block-sparse GEMMs): P programs of `tiles` tiles each, `resident`
  programs per SM. An SM runs its programs one after the other at the tensor-core rate (two resident programs
  share it), so the MMA time is ⌈P / SMs⌉ · tiles · tile FLOPs / (SM FLOPs per cycle · triton_mma_efficiency),
  the wave quantisation included. The softmax epilogue costs epilogue_cycles per logit and SM; with one program
  per SM it adds to the MMA, with two the other program's MMA hides epilogue_overlap of it.
- cuBLAS GEMMs: the FLOPs at cublas_efficiency of peak, over the wave efficiency of 128×256 output tiles on the SMs;
  where fewer tiles than SMs would leave the GPU idle and K is long, split-K as cuBLAS's heuristics pick it.
- Streams (row kernels, casts, gathers, small torch ops): HBM bytes at hbm_efficiency of the bandwidth.
- Each launch is max(compute, memory) plus launch_s; launches run one after the other.

The GPUs: H100 SXM and H200, both 989 TFLOP/s dense bf16 on 132 SMs at 1.83 GHz (4096 FLOP per cycle and SM); HBM
3.35 TB/s (H100) and 4.8 TB/s (H200). The free parameters (`Params`) start from the review's estimates (Triton
fused kernels ~60% of peak, cuBLAS ~75%, 90% of HBM) and `fit` calibrates them from per-kernel times measured on a
GPU (bench/gpu_run.py writes them). The share of a path is the time of the same-run cuBLAS 6·N·H·V (three GEMMs of
the logits' shape at the cuBLAS rate) over the path's time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    hbm_bytes_per_s: float
    peak_flops: float = 989e12
    num_sms: int = 132
    clock_hz: float = 1.83e9

    @property
    def flops_per_cycle_per_sm(self) -> float:
        return self.peak_flops / (self.num_sms * self.clock_hz)


GPUS = {"h100": Gpu("H100 SXM", 3.35e12), "h200": Gpu("H200", 4.8e12)}


@dataclasses.dataclass(frozen=True)
class Params:
    """Free parameters of the model (fitted by `fit`): rates as shares of peak, the epilogue's SM cycles per logit
    element (~1/16 for the exp on the 16 MUFU lanes of an SM plus ~10 FP32 ops on 128 lanes), the share of it a
    second resident program hides, the launch gap."""

    triton_mma_efficiency: float = 0.60
    cublas_efficiency: float = 0.75
    hbm_efficiency: float = 0.90
    epilogue_cycles: float = 0.14
    epilogue_overlap: float = 0.8
    launch_s: float = 4e-6


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch (or `count` identical ones). kind: "triton" (programs × tiles of tile_flops, epilogue
    elements per tile, resident programs per SM), "cublas" (an m×n×k GEMM) or "stream" (bytes only); host_s: host
    time the GPU waits for (a synchronizing step)."""

    name: str
    kind: str
    flops: float
    hbm_bytes: float
    count: int = 1
    programs: int = 0
    tiles: int = 0
    tile_flops: float = 0.0
    epilogue_elems: float = 0.0
    resident: int = 1
    m: int = 0
    n: int = 0
    k: int = 0
    host_s: float = 0.0

    def seconds(self, gpu: Gpu, p: Params) -> float:
        """Predicted time of all `count` launches."""
        memory = self.hbm_bytes / (gpu.hbm_bytes_per_s * p.hbm_efficiency)
        if self.kind == "triton":
            per_sm = math.ceil(self.programs / gpu.num_sms) * self.tiles
            exposed = 1.0 - (p.epilogue_overlap if self.resident > 1 else 0.0)
            cycles = per_sm * (self.tile_flops / (gpu.flops_per_cycle_per_sm * p.triton_mma_efficiency)
                               + exposed * p.epilogue_cycles * self.epilogue_elems)
            compute = cycles / gpu.clock_hz
        elif self.kind == "cublas":
            compute = self.flops / (gpu.peak_flops * p.cublas_efficiency * cublas_wave_fill(self.m, self.n, self.k,
                                                                                           gpu.num_sms))
        else:
            compute = 0.0
        return self.count * (max(compute, memory) + p.launch_s + self.host_s)

    def terms(self, gpu: Gpu) -> tuple[float, float, float]:
        """(MMA cycles at efficiency 1, epilogue cycles at 1 cycle per element, exposed-epilogue flag) of one
        launch of a Triton kernel: the linear terms `fit` solves for."""
        per_sm = math.ceil(self.programs / gpu.num_sms) * self.tiles
        return (per_sm * self.tile_flops / gpu.flops_per_cycle_per_sm, per_sm * self.epilogue_elems,
                1.0 if self.resident > 1 else 0.0)


CUBLAS_TILE = (128, 256)
MAX_SPLIT_K = 16


def cublas_wave_fill(m: int, n: int, k: int, num_sms: int) -> float:
    """Share of the SMs' time a cuBLAS GEMM's output tiles (128×256, either orientation) keep busy over its waves;
    below one wave with K ≥ 8·max(m, n), split-K in [1, 16] parts filling the waves best (cuBLAS's heuristics do
    split tall-K GEMMs; the gradient-in-forward d_hidden GEMM, 1766 × H with K = V, relies on it)."""
    tiles = min(math.ceil(m / CUBLAS_TILE[0]) * math.ceil(n / CUBLAS_TILE[1]),
                math.ceil(m / CUBLAS_TILE[1]) * math.ceil(n / CUBLAS_TILE[0]))

    def fill(units: int) -> float:
        return units / (math.ceil(units / num_sms) * num_sms)

    best = fill(tiles)
    if best < 0.9 and k >= 8 * max(m, n):
        best = max(fill(tiles * s) for s in range(1, MAX_SPLIT_K + 1))
    return best


def triton_launch(name: str, programs: int, tiles: int, tile_flops: float, epilogue_elems: float, resident: int,
                  hbm_bytes: float, count: int = 1) -> Launch:
    return Launch(name, "triton", flops=programs * tiles * tile_flops, hbm_bytes=hbm_bytes, count=count,
                  programs=programs, tiles=tiles, tile_flops=tile_flops, epilogue_elems=epilogue_elems,
                  resident=resident)


def cublas_launch(name: str, m: int, n: int, k: int, hbm_bytes: float, count: int = 1) -> Launch:
    return Launch(name, "cublas", flops=2.0 * m * n * k, hbm_bytes=hbm_bytes, count=count, m=m, n=n, k=k)


def stream_launch(name: str, hbm_bytes: float, count: int = 1, host_s: float = 0.0) -> Launch:
    return Launch(name, "stream", flops=0.0, hbm_bytes=hbm_bytes, count=count, host_s=host_s)


def total_seconds(launches: Iterable[Launch], gpu: Gpu, p: Params) -> float:
    return sum(launch.seconds(gpu, p) for launch in launches)


def reference_seconds(n: int, h: int, v: int, gpu: Gpu, p: Params, element: int = 2) -> float:
    """The same-run 6·N·H·V cuBLAS time: three GEMMs of the logits' shape (N×H)@(H×V) at the cuBLAS rate."""
    gemm = cublas_launch("reference", n, v, h, (n * h + v * h) * element + n * v * element)
    return 3.0 * (gemm.seconds(gpu, p) - p.launch_s)


@dataclasses.dataclass(frozen=True)
class Measured:
    """A launch timed on a GPU (bench/gpu_run.py): the launch as the model sees it and its median seconds."""

    launch: Launch
    seconds: float


def fit(measured: Sequence[Measured], gpu: Gpu, start: Params = Params()) -> Params:
    """Parameters that best explain per-launch times measured on `gpu`.

    cuBLAS launches give cublas_efficiency (median of FLOPs / (peak · wave fill · time)); stream launches
    hbm_efficiency (median of bytes / (bandwidth · time)); Triton launches a least-squares fit of
    time · clock = a / triton_mma_efficiency + b · epilogue_cycles · (1 − overlap · two_programs) with a, b the
    MMA and epilogue terms of each launch (one program per SM pins the epilogue, two the overlap). A parameter
    without a measurement keeps its value from `start`.
    """
    out = dataclasses.asdict(start)
    cublas = [m.launch.flops / (gpu.peak_flops * cublas_wave_fill(m.launch.m, m.launch.n, m.launch.k, gpu.num_sms)
                                * (m.seconds / m.launch.count - start.launch_s))
              for m in measured if m.launch.kind == "cublas" and m.seconds > 0]
    if cublas:
        out["cublas_efficiency"] = float(np.median(cublas))
    streams = [m.launch.hbm_bytes / (gpu.hbm_bytes_per_s * (m.seconds / m.launch.count - start.launch_s))
               for m in measured if m.launch.kind == "stream" and m.launch.hbm_bytes > 1e8 and m.seconds > 0]
    if streams:
        out["hbm_efficiency"] = float(min(1.0, np.median(streams)))
    triton = [m for m in measured if m.launch.kind == "triton" and m.seconds > 0]
    if triton:
        out.update(_fit_triton(triton, gpu, start))
    return Params(**out)


def _fit_triton(measured: Sequence[Measured], gpu: Gpu, start: Params) -> dict[str, float]:
    """Least squares over (1 / efficiency, epilogue cycles with one program per SM, with two); where the launches
    cannot separate the three (one shape: the terms are proportional), the overlap and then the epilogue keep their
    `start` values and fewer unknowns are fitted."""
    terms = [m.launch.terms(gpu) for m in measured]
    target = np.array([(m.seconds / m.launch.count - start.launch_s) * gpu.clock_hz for m in measured])
    full = np.array([[mma, epi * (1.0 - shared), epi * shared] for mma, epi, shared in terms])
    if np.linalg.matrix_rank(full) == 3:
        inv_eff, epi_single, epi_shared = np.linalg.lstsq(full, target, rcond=None)[0]
        if inv_eff > 0 and epi_single > 0:
            return {"triton_mma_efficiency": float(min(1.0, 1.0 / inv_eff)), "epilogue_cycles": float(epi_single),
                    "epilogue_overlap": float(min(1.0, max(0.0, 1.0 - epi_shared / epi_single)))}
    exposed = np.array([[mma, epi * (1.0 - start.epilogue_overlap * shared)] for mma, epi, shared in terms])
    if np.linalg.matrix_rank(exposed) == 2:
        inv_eff, epi_cycles = np.linalg.lstsq(exposed, target, rcond=None)[0]
        if inv_eff > 0 and epi_cycles > 0:
            return {"triton_mma_efficiency": float(min(1.0, 1.0 / inv_eff)), "epilogue_cycles": float(epi_cycles)}
    rest = target - exposed[:, 1] * start.epilogue_cycles
    inv_eff = float(np.dot(exposed[:, 0], rest) / np.dot(exposed[:, 0], exposed[:, 0]))
    return {"triton_mma_efficiency": float(min(1.0, 1.0 / inv_eff))} if inv_eff > 0 else {}
