"""Roofline model of the fused policy loss, readable without a GPU: every kernel and path at Qwen3 shapes.

    python -m bench.roofline [--n 8192,16384,32768] [--json roofline.json] [--jobs 2] [--no-compile]

For each path (forward + backward of the loss) and shape it lists the steps (Triton kernels, cuBLAS GEMMs, memory
passes) with FLOPs, HBM bytes and global atomic bytes, and predicts each step's time as
max(FLOPs / 790 TFLOP/s, HBM bytes / 4.8 TB/s) plus atomic bytes / L2_ATOMIC_BYTES_PER_S (atomics serialize
after each GEMM step in the kernel that issues them); steps run one after another. The share printed is the time
a cuBLAS-rate 6·N·H·V would take over the predicted time (the convention every peer reports). The Triton kernels
are compiled for sm_90a first (bench/compile_report.py): registers, spills, shared memory and wgmma come from the
compiled code, occupancy (programs per SM) from registers and shared memory, and a kernel's global atomic bytes
are its PTX float-atomic instruction count × 32 lanes × warps × 4 bytes × loop trips × launches.

Paths: "old" is the design before issue 10 (commit f90611c: fp32 atomic adds into d_hidden and d_weight per tile,
row-block-fastest forward), modelled from its formulas since its kernel is gone; "triton" is the no-logits path
(8·N·H·V, dz slices + cuBLAS); "grad_in_forward" is the 6·N·H·V path with a 1 GiB fp32 logits chunk. All rows carry
a gradient (compaction would scale the backward by the kept share).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import markdown_table

PEAK_FLOPS = 790e12
HBM_BYTES_PER_S = 4.8e12
# L2 throughput of fp32 atomic adds: no primary source (DESIGN.md §7: 2-8 TB/s); bench/gpu_run measures it.
L2_ATOMIC_BYTES_PER_S = 4.0e12
L2_BYTES = 50e6
NUM_SMS = 132
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 233472
# Launch and small elementwise-kernel cost (the per-chunk token-gradient autograd runs ~40 tiny kernels).
LAUNCH_S = 4e-6
TOKEN_GRAD_LAUNCHES = 40
ELEMENT = 2  # bf16
SHAPES = {"qwen3-4b": (2560, 151936), "qwen3-8b": (4096, 151936)}
FUSED_MODULES = ("dsrl_fast.kernels.linear_logprobs", "dsrl_fast.kernels.logits_rows")
PATHS = ("old", "triton", "grad_in_forward")


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """What the sm_90a compile of one kernel variant says (bf16 operands)."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma_count: int
    float_atomic_count: int
    num_warps: int

    @property
    def programs_per_sm(self) -> int:
        by_regs = REGISTERS_PER_SM // max(1, self.registers * 32 * self.num_warps)
        by_smem = SHARED_PER_SM // max(1, self.shared_bytes)
        return max(1, min(by_regs, by_smem))


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a path: kernel launches, and FLOPs, HBM bytes and global atomic bytes over all of them."""

    name: str
    launches: int
    flops: float
    hbm_bytes: float
    atomic_bytes: float = 0.0
    kernel: str | None = None

    @property
    def seconds(self) -> float:
        return (max(self.flops / PEAK_FLOPS, self.hbm_bytes / HBM_BYTES_PER_S)
                + self.atomic_bytes / L2_ATOMIC_BYTES_PER_S + self.launches * LAUNCH_S)


@dataclasses.dataclass(frozen=True)
class PathModel:
    path: str
    shape: str
    n: int
    h: int
    v: int
    steps: list[Step]
    workspace_bytes: float

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def share(self) -> float:
        return 6.0 * self.n * self.h * self.v / PEAK_FLOPS / self.seconds

    @property
    def logits_share(self) -> float:
        """Peak temporaries beyond inputs and outputs over the fp32 logits (N·V·4 bytes)."""
        return self.workspace_bytes / (self.n * self.v * 4.0)


def _grid_hbm(a_bytes: float, b_bytes: float, a_blocks: int, b_blocks: int, in_flight: int, group: int) -> float:
    """HBM reads of a grouped-raster GEMM-like grid: `group` A-blocks sweep the B-blocks together, so each A panel
    is read once per sweep of the B-blocks in flight and each B panel once per group of A-blocks in flight."""
    rows_in_flight = max(1, min(a_blocks, group, in_flight))
    cols_in_flight = max(1, in_flight // rows_in_flight)
    return a_bytes * math.ceil(b_blocks / cols_in_flight) + b_bytes * math.ceil(a_blocks / rows_in_flight)


def _atomic_bytes(info: KernelInfo | None, programs: int, trips: int) -> float:
    if info is None:
        return 0.0
    return info.float_atomic_count * 32 * info.num_warps * 4.0 * trips * programs


def model_old(shape: str, n: int, h: int, v: int) -> PathModel:
    """The pre-issue-10 design: row-block-fastest forward, per-tile fp32 atomics in the backward."""
    e = ELEMENT
    bn_f, bv_f, bn_b, bv_b = 128, 128, 64, 128
    row_blocks = math.ceil(n / bn_f)
    splits = max(1, min(math.ceil(v / bv_f), math.ceil(4 * NUM_SMS / row_blocks)))
    panels_in_flight = min(row_blocks, NUM_SMS) * bn_f * h * e
    hidden_reads = math.ceil(v / bv_f) / splits if panels_in_flight > L2_BYTES else 1
    fwd = Step("forward (row blocks fastest)", 1, 2.0 * n * h * v,
               n * h * e * hidden_reads * splits + v * h * e)
    atomics = 4.0 * (n * h * math.ceil(v / bv_b) + v * h * math.ceil(n / bn_b))
    bwd = Step("backward, fp32 atomics into dh and dW", 1, 6.0 * n * h * v, (n * h + v * h) * e * 2, atomics)
    cast = Step("cast fp32 dh, dW", 2, 0.0, (n * h + v * h) * (4 + e))
    return PathModel("old", shape, n, h, v, [fwd, bwd, cast], workspace_bytes=(n * h + v * h) * 4.0)


def model_triton(shape: str, n: int, h: int, v: int, infos: dict[str, KernelInfo]) -> PathModel:
    from dsrl_fast.kernels import linear_logprobs as k

    e = ELEMENT
    fcfg, dcfg = k.FORWARD_CONFIG, k.DLOGITS_CONFIG
    fwd_info = infos.get("_forward_kernel entropy")
    dlg_info = infos.get("_dlogits_kernel logp")
    row_blocks = math.ceil(n / fcfg.block_n)
    tiles = math.ceil(v / fcfg.block_v)
    splits = math.ceil(tiles / math.ceil(tiles / k.num_splits(row_blocks, tiles, NUM_SMS)))
    in_flight = NUM_SMS * (fwd_info.programs_per_sm if fwd_info else 1)
    fwd_hbm = _grid_hbm(n * h * e, v * h * e, row_blocks, splits, in_flight, max(1, in_flight // splits))
    steps = [Step("_forward_kernel (grouped raster)", 1, 2.0 * n * h * v,
                  fwd_hbm + 16.0 * splits * n, _atomic_bytes(fwd_info, row_blocks * splits, 1), "_forward_kernel"),
             Step("combine partials", 8, 0.0, 16.0 * splits * n + 12.0 * n)]
    width = k.slice_width(v, e, h)
    slices = math.ceil(v / width)
    dl_in_flight = NUM_SMS * (dlg_info.programs_per_sm if dlg_info else 1)
    rb, cb = math.ceil(n / dcfg.block_n), math.ceil(width / dcfg.block_v)
    dlg_hbm = _grid_hbm(n * h * e, width * h * e, rb, cb, dl_in_flight, k.GROUP_ROWS) + n * width * e
    steps += [
        Step(f"_dlogits_kernel × {slices} slices of {width}", slices, 2.0 * n * h * v, dlg_hbm * slices,
             _atomic_bytes(dlg_info, rb * cb, 1) * slices, "_dlogits_kernel"),
        Step(f"cuBLAS dh += dz·W_slice × {slices}", slices, 2.0 * n * h * v,
             slices * (n * width * e + width * h * e + n * h * 8.0)),
        Step(f"cuBLAS dW_slice = dzᵀ·h × {slices}", slices, 2.0 * n * h * v, slices * (n * width * e + n * h * e)
             + v * h * e),
        Step("cast fp32 dh", 1, 0.0, n * h * (4.0 + e)),
    ]
    # Temporaries: the dz slice and the fp32 d_hidden accumulator (dz is freed before the accumulator is cast).
    return PathModel("triton", shape, n, h, v, steps, workspace_bytes=n * width * e + n * h * 4.0)


def model_grad_in_forward(shape: str, n: int, h: int, v: int, infos: dict[str, KernelInfo]) -> PathModel:
    from dsrl_fast import grad_in_forward_loss as gif

    e = ELEMENT
    chunk = min(n, gif.chunk_rows(v, gif.DEFAULT_WORKSPACE_BYTES))
    chunks = math.ceil(n / chunk)
    stats_info = infos.get("_row_stats_kernel entropy")
    grad_info = infos.get("_row_grad_kernel logp")
    steps = [
        Step(f"cuBLAS fp32 logits × {chunks} chunks of {chunk}", chunks, 2.0 * n * h * v,
             n * h * e + chunks * v * h * e + n * v * 4.0),
        Step("_row_stats_kernel", chunks, 0.0, n * v * 4.0, _atomic_bytes(stats_info, n, 1), "_row_stats_kernel"),
        Step("token gradient (autograd, O(chunk))", chunks * TOKEN_GRAD_LAUNCHES, 0.0, 64.0 * n),
        Step("_row_grad_kernel (dz over the logits)", chunks, 0.0, n * v * (4.0 + e),
             _atomic_bytes(grad_info, n, 1), "_row_grad_kernel"),
        Step("cuBLAS dh = dz·W", chunks, 2.0 * n * h * v, n * v * e + chunks * v * h * e + n * h * e),
        Step("cuBLAS dW += dzᵀ·h", chunks, 2.0 * n * h * v, n * v * e + n * h * e + chunks * v * h * e * 2),
    ]
    return PathModel("grad_in_forward", shape, n, h, v, steps, workspace_bytes=chunk * v * 4.0)


def compile_infos(jobs: int) -> tuple[dict[str, KernelInfo], list[list[str]]]:
    """Compile the fused-loss kernels (bf16) for sm_90a: per "kernel variant" info and the printed table rows."""
    from bench.compile_report import collect, load_specs

    results = collect(FUSED_MODULES, jobs)
    warps = {(s["kernel"].__name__, s["variant"], s["dtype"]): s["num_warps"]
             for m in FUSED_MODULES for s in load_specs(m)}
    infos: dict[str, KernelInfo] = {}
    rows = []
    for r in results:
        if r.error:
            raise RuntimeError(f"{r.kernel} {r.variant} {r.dtype} failed to compile: {r.error}")
        info = KernelInfo(r.registers or 0, r.spill_bytes or 0, r.shared_bytes or 0, r.wgmma_count or 0,
                          r.float_atomic_count or 0, warps[(r.kernel, r.variant, r.dtype)])
        if r.dtype == "bf16":
            infos[f"{r.kernel} {r.variant}"] = info
        rows.append([r.kernel, r.variant, r.dtype, r.config, str(info.registers), str(info.spill_bytes),
                     str(info.shared_bytes), f"yes ({info.wgmma_count})" if info.wgmma_count else "no",
                     str(info.float_atomic_count), str(info.programs_per_sm)])
    return infos, rows


def build(ns: Sequence[int], infos: dict[str, KernelInfo]) -> list[PathModel]:
    models = []
    for shape, (h, v) in SHAPES.items():
        for n in ns:
            models += [model_old(shape, n, h, v), model_triton(shape, n, h, v, infos),
                       model_grad_in_forward(shape, n, h, v, infos)]
    return models


def summary_rows(models: Sequence[PathModel]) -> list[list[str]]:
    rows = []
    for m in models:
        flops = sum(s.flops for s in m.steps)
        rows.append([m.shape, str(m.n), m.path, f"{flops / (m.n * m.h * m.v):.0f}·NHV",
                     f"{sum(s.hbm_bytes for s in m.steps) / 1e9:.1f}",
                     f"{sum(s.atomic_bytes for s in m.steps) / 1e9:.1f}", f"{m.seconds * 1e3:.1f}",
                     f"{100 * m.share:.0f}%", f"{100 * m.logits_share:.1f}%"])
    return rows


def step_rows(models: Sequence[PathModel]) -> list[list[str]]:
    return [[m.shape, str(m.n), m.path, s.name, str(s.launches), f"{s.flops / 1e12:.1f}", f"{s.hbm_bytes / 1e9:.2f}",
             f"{s.atomic_bytes / 1e9:.1f}", f"{s.seconds * 1e3:.2f}"] for m in models for s in m.steps]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="8192,16384,32768", help="comma list of token counts")
    p.add_argument("--json", type=Path, default=None, help="also write the models as JSON here")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    p.add_argument("--no-compile", action="store_true", help="skip the sm_90a compile (occupancy 1, no PTX data)")
    p.add_argument("--steps", action="store_true", help="also print every step of every path and shape")
    args = p.parse_args(argv)
    try:
        ns = [int(x) for x in args.n.split(",") if x.strip()]
    except ValueError:
        ns = []
    if not ns or any(x <= 0 for x in ns):
        p.error(f"--n must be a comma list of positive ints, got {args.n!r}")
    infos: dict[str, KernelInfo] = {}
    if not args.no_compile:
        from triton import knobs

        if knobs.runtime.interpret:
            p.error("TRITON_INTERPRET must be unset to compile kernels (or pass --no-compile)")
        infos, kernel_rows = compile_infos(args.jobs)
        print("## Fused-loss kernels compiled for sm_90a\n")
        print(markdown_table(["kernel", "variant", "dtype", "config", "regs", "spill bytes", "smem bytes", "wgmma",
                              "f32 atomics (PTX)", "programs/SM"], kernel_rows))
    models = build(ns, infos)
    print(f"\n## Predicted forward+backward of the policy loss, bf16, {PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
          f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s HBM, {L2_ATOMIC_BYTES_PER_S / 1e12:.1f} TB/s L2 atomics (assumed)\n")
    print(markdown_table(["shape", "N", "path", "FLOPs", "HBM GB", "atomic GB", "predicted ms",
                          "% of 6NHV cuBLAS rate", "workspace % fp32 logits"], summary_rows(models)))
    if args.steps:
        print("\n## Steps\n")
        print(markdown_table(["shape", "N", "path", "step", "launches", "TFLOP", "HBM GB", "atomic GB", "ms"],
                             step_rows(models)))
    if args.json:
        payload = [{"path": m.path, "shape": m.shape, "N": m.n, "H": m.h, "V": m.v, "seconds": m.seconds,
                    "share_of_6nhv_rate": m.share, "workspace_share_of_fp32_logits": m.logits_share,
                    "steps": [{**dataclasses.asdict(s), "seconds": s.seconds} for s in m.steps]} for m in models]
        args.json.write_text(json.dumps({"kernels": {k: {**dataclasses.asdict(i), "programs_per_sm": i.programs_per_sm}
                                                     for k, i in infos.items()}, "models": payload}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
