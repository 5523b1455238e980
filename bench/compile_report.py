"""Compile every Triton kernel for Hopper (sm_90a) without a GPU and report registers, spills, shared memory, wgmma.

    python -m bench.compile_report [--json report.json] [--jobs 2]

Each kernel module listed in KERNEL_MODULES exports `compile_specs()`: a list of dicts with keys kernel (the
@triton.jit function), variant, dtype, signature ({runtime argument: "*bf16" | "i32" | "fp32" | ...}), constexprs
({constexpr argument: value}), aligned (integer arguments the launcher sees as multiples of 16), num_warps,
num_stages and expect_wgmma. Every entry is compiled with `triton.compile` for GPUTarget("cuda", 90, 32); the PTX
goes through Triton's bundled ptxas with the flags Triton itself uses, and `ptxas -v` gives registers, spill bytes
and stack. Shared memory is the compiled kernel's dynamic allocation (metadata.shared, what a launch requests) plus
any static shared memory ptxas reports. @triton.jit helpers called from a kernel are inlined into it, so their cost
shows up in the caller's numbers. Must run without TRITON_INTERPRET=1 (the decorator then returns an interpreter
function, which cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from bench.harness import markdown_table

# Adding a kernel module to the report is one entry here (the module must export compile_specs()).
KERNEL_MODULES = ("dsrl_fast.kernels.linear_logprobs", "dsrl_fast.kernels.sparse_grads", "dsrl_fast.kernels.logits_rows",
                  "dsrl_fast.kernels.varlen_attention", "dsrl_fast.kernels.varlen_attention_bwd")
CAPABILITY = 90
WARP_SIZE = 32
# Opt-in dynamic shared memory per block on sm_90 (227 KiB), shared memory per SM (228 KiB, 1 KiB of it reserved
# per resident block) and registers per SM.
MAX_SHARED_BYTES = 232448
SHARED_PER_SM = 233472
SHARED_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
SPEC_KEYS = frozenset({"kernel", "variant", "dtype", "signature", "constexprs", "aligned", "num_warps", "num_stages",
                       "expect_wgmma"})
OPTIONAL_SPEC_KEYS = frozenset({"maxnreg", "resident_per_sm"})


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """What one compile entry produced; error is the failure message when it did not compile."""

    module: str
    kernel: str
    variant: str
    dtype: str
    config: str
    expect_wgmma: bool
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    wgmma_count: int | None = None
    float_atomic_count: int | None = None
    barrier_count: int | None = None
    num_warps: int = 4
    resident_claimed: int | None = None
    compile_s: float | None = None
    error: str | None = None

    @property
    def spill_bytes(self) -> int | None:
        if self.spill_store_bytes is None or self.spill_load_bytes is None:
            return None
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def programs_per_sm(self) -> int | None:
        """Programs an sm_90 SM holds at once by registers and shared memory (None when it did not compile)."""
        if self.registers is None or self.shared_bytes is None:
            return None
        by_regs = REGISTERS_PER_SM // max(1, -(-self.registers // 8) * 8 * WARP_SIZE * self.num_warps)
        by_smem = SHARED_PER_SM // max(1, self.shared_bytes + SHARED_RESERVED_PER_BLOCK)
        return max(0, min(by_regs, by_smem))


def config_label(spec: dict[str, Any]) -> str:
    """Tile constexprs (BLOCK_*) joined by "x", then warps and stages: "128x128x64 w8 s3"."""
    blocks = "x".join(str(v) for k, v in spec["constexprs"].items() if k.startswith("BLOCK"))
    cap = f" r{spec['maxnreg']}" if spec.get("maxnreg") else ""
    return f"{blocks} w{spec['num_warps']} s{spec['num_stages']}{cap}"


def load_specs(module_name: str) -> list[dict[str, Any]]:
    """The module's compile_specs(), checked for the keys and for compilable (non-interpreter) kernels."""
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(module_name)
    specs_fn = getattr(module, "compile_specs", None)
    if specs_fn is None:
        raise ValueError(f"{module_name} must export compile_specs() to be in the compile report, found none")
    specs = specs_fn()
    for spec in specs:
        if not SPEC_KEYS <= set(spec) <= SPEC_KEYS | OPTIONAL_SPEC_KEYS:
            raise ValueError(f"{module_name}.compile_specs() entries must have keys {sorted(SPEC_KEYS)} (and "
                             f"optionally {sorted(OPTIONAL_SPEC_KEYS)}), got {sorted(spec)}")
        if not isinstance(spec["kernel"], JITFunction):
            raise TypeError(f"{module_name}: kernel must be a triton JITFunction, got {type(spec['kernel']).__name__}"
                            " (is TRITON_INTERPRET=1 set? the report must run without it)")
    return specs


def _full_signature(spec: dict[str, Any]) -> tuple[dict[str, str], dict[tuple[int, ...], Any]]:
    """Signature over every kernel argument in order ("constexpr" for constexprs) and the divisibility attrs."""
    fn = spec["kernel"]
    names: list[str] = list(fn.arg_names)
    given = set(spec["signature"]) | set(spec["constexprs"])
    assert given == set(names), f"{fn.__name__}: spec covers {sorted(given)}, kernel takes {names}"
    signature: dict[str, str] = {n: "constexpr" if n in spec["constexprs"] else spec["signature"][n] for n in names}
    aligned = set(spec["aligned"])
    attrs: dict[tuple[int, ...], Any] = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in aligned}
    return signature, attrs


class PtxasUsage(NamedTuple):
    """Per-thread registers, stack frame and spill bytes, and static shared memory of one sm_90a cubin."""

    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_shared_bytes: int


def ptxas_usage(ptx: str) -> PtxasUsage:
    """Run Triton's bundled ptxas on `ptx` for sm_90a (Triton's own flags) and parse `-v`: registers, spills, stack,
    static shared memory."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(CAPABILITY).path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
               str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    assert regs and frame, f"unexpected ptxas output:\n{log}"
    return PtxasUsage(registers=int(regs.group(1)), stack_bytes=int(frame.group(1)),
                      spill_store_bytes=int(frame.group(2)), spill_load_bytes=int(frame.group(3)),
                      static_shared_bytes=int(smem.group(1)) if smem else 0)


# Global float atomics/reductions in PTX: `red.global.add.f32`, `atom.global.v2.f32.add`, `red.relaxed.gpu.global...`.
FLOAT_ATOMIC_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:red|atom)\.[\w.]*global[\w.]*\.(?:f32|f16|bf16|f64)\b",
                             re.MULTILINE)


def float_atomic_count(ptx: str) -> int:
    """Static count of global floating-point atomic/reduction instructions (`red.global` / `atom.global`) in PTX."""
    return len(FLOAT_ATOMIC_RE.findall(ptx))


# CTA barriers in PTX: `bar.sync 0;`, `barrier.sync 0;`, `bar.sync.aligned`, `barrier.sync.aligned 0, 256;`.
BARRIER_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:bar|barrier)\.sync\b", re.MULTILINE)


def barrier_count(ptx: str) -> int:
    """Static count of CTA barrier instructions (`bar.sync` / `barrier.sync`) in PTX."""
    return len(BARRIER_RE.findall(ptx))


def compile_spec(spec: dict[str, Any], module_name: str) -> CompileResult:
    """Compile one compile_specs() entry for sm_90a and measure it (also usable to try other configs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    base = CompileResult(module=module_name, kernel=spec["kernel"].__name__, variant=spec["variant"],
                         dtype=spec["dtype"], config=config_label(spec), expect_wgmma=spec["expect_wgmma"],
                         num_warps=spec["num_warps"], resident_claimed=spec.get("resident_per_sm"))
    start = time.perf_counter()
    try:
        signature, attrs = _full_signature(spec)
        src = ASTSource(fn=spec["kernel"], signature=signature, constexprs=spec["constexprs"], attrs=attrs)
        options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
        if spec.get("maxnreg") is not None:
            options["maxnreg"] = spec["maxnreg"]
        compiled = triton.compile(src, target=GPUTarget("cuda", CAPABILITY, WARP_SIZE), options=options)
        ptx = compiled.asm["ptx"]
        usage = ptxas_usage(ptx)
    except Exception as exc:  # noqa: BLE001 - a failed entry is reported in the table, the others still run
        return dataclasses.replace(base, error=f"{type(exc).__name__}: {exc}"[:2000],
                                   compile_s=time.perf_counter() - start)
    return dataclasses.replace(base, registers=usage.registers, spill_store_bytes=usage.spill_store_bytes,
                               spill_load_bytes=usage.spill_load_bytes, stack_bytes=usage.stack_bytes,
                               shared_bytes=compiled.metadata.shared + usage.static_shared_bytes,
                               wgmma_count=ptx.count("wgmma.mma_async"), float_atomic_count=float_atomic_count(ptx),
                               barrier_count=barrier_count(ptx), compile_s=time.perf_counter() - start)


def compile_entry(module_name: str, index: int) -> CompileResult:
    """Compile entry `index` of the module's compile_specs() (the unit of work of a report process)."""
    return compile_spec(load_specs(module_name)[index], module_name)


def collect(modules: Sequence[str], jobs: int) -> list[CompileResult]:
    """Compile every entry of every module, `jobs` processes at a time (spawned: no state shared with the caller)."""
    tasks = [(m, i) for m in modules for i in range(len(load_specs(m)))]
    if jobs <= 1:
        return [compile_entry(m, i) for m, i in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_entry, *zip(*tasks)))


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_table(results: Sequence[CompileResult]) -> str:
    headers = ["kernel", "variant", "dtype", "config", "regs", "spill bytes (st/ld)", "stack", "smem bytes", "wgmma",
               "f32 atomics", "bar.sync", "programs/SM", "compile s"]
    rows = []
    for r in results:
        if r.error:
            rows.append([r.kernel, r.variant, r.dtype, r.config, "FAILED", "-", "-", "-", "-", "-", "-", "-",
                         f"{r.compile_s:.1f}"])
            continue
        spills = f"{r.spill_bytes} ({r.spill_store_bytes}/{r.spill_load_bytes})"
        wgmma = f"yes ({r.wgmma_count})" if r.wgmma_count else "no"
        rows.append([r.kernel, r.variant, r.dtype, r.config, _cell(r.registers), spills, _cell(r.stack_bytes),
                     _cell(r.shared_bytes), wgmma, _cell(r.float_atomic_count), _cell(r.barrier_count),
                     _cell(r.programs_per_sm), f"{r.compile_s:.1f}"])
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="also write the results as a JSON list here")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile processes")
    p.add_argument("--modules", default=",".join(KERNEL_MODULES), help="comma list of kernel modules")
    args = p.parse_args(argv)
    from triton import knobs

    if knobs.runtime.interpret:
        p.error(f"TRITON_INTERPRET must be unset to compile kernels, got TRITON_INTERPRET="
                f"{os.environ['TRITON_INTERPRET']!r}")
    start = time.perf_counter()
    results = collect([m.strip() for m in args.modules.split(",") if m.strip()], args.jobs)
    wall = time.perf_counter() - start
    print(format_table(results))
    for r in results:
        if r.error:
            print(f"\nFAILED {r.kernel} {r.variant} {r.dtype}: {r.error}", file=sys.stderr)
    print(f"\n{len(results)} entries for sm_90a in {wall:.1f} s ({args.jobs} processes)")
    if args.json:
        payload = [{**dataclasses.asdict(r), "spill_bytes": r.spill_bytes, "programs_per_sm": r.programs_per_sm}
                   for r in results]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
