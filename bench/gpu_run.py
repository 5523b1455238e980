"""One GPU call that settles the fused loss's claims, within a deadline, leaving one JSON and one Markdown report.

    python -m bench.gpu_run [OUT] [--deadline 420]        # a CUDA machine; OUT: bench/results/<date>-<gpu>/
    TRITON_INTERPRET=1 python -m bench.gpu_run OUT --dry-run   # CPU check (CI): tiny shapes, the interpreter

Sections, in order, each given what is left of the global deadline (7 minutes by default; a section that would
not fit is recorded as skipped, with the reason), results rewritten after each (a cut run still leaves them):

- environment: GPU, versions, git sha, the 16-bit GEMM path; the measured ceilings (device copy, 8192³ bf16 GEMM).
- kernels: every kernel of both paths timed alone at Qwen3-4B/8B, N = 8k/16k, bf16 (CUDA events), the
  roofline's parameters fitted to them (bench.roofline_model.fit) and each launch's predicted time before and
  after the fit.
- paths: forward + backward of both paths through policy_loss on flat logits (dense backward) and on a peaked
  stand-in (tile skipping), the same-run cuBLAS GEMM, the share of the 6·N·H·V cuBLAS rate, the kept share of
  tiles, peak memory above the inputs split into output gradients and workspace, the fitted prediction next to it.
- hazards: the in-place dz race stress (many rows, repeated, bitwise against a separate output), bitwise repeats
  of both paths, an NSR-style batch with half the rows without gradient (compaction), the host syncs of each path
  (torch.cuda.set_sync_debug_mode), the tile-skip error against the dense backward and against float64.
- peers: Liger's SM90 CuTe and Triton fused linear cross-entropy, TRL chunked_logprob, verl
  linear_cross_entropy, Cut Cross-Entropy, in this process (time, peak memory above the inputs); a missing one is
  skipped with the reason.
- tests: the fused-loss tests on the device (GPU-marked ones included), every test run (no -x), each outcome.
- update_step: one Qwen3-4B-architecture update step against the memory plan (bench/real_step.py).
- sweep: with the time left, the forward's candidate configs per token-count bucket, the backward slice widths
  and the row kernels' blocks (bench/kernel_sweep.py): the evidence for the vetted choices.

OUT receives results.json, results.md and run.log (3 files, flat: what a device call can bring back).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.harness import REPO_ROOT, run_metadata

DEFAULT_DEADLINE_S = 420
GPU_SHAPES = (("qwen3-4b", 8192), ("qwen3-8b", 8192), ("qwen3-4b", 16384), ("qwen3-8b", 16384))
DRY_SHAPE = ("tiny", 64, 64, 1007)
DEVICE_TESTS = ("tests/ops/test_gemm.py", "tests/ops/test_linear_logprobs.py", "tests/loss/test_grad_in_forward.py",
                "tests/ops/test_logits_rows.py", "tests/ops/test_tile_skip.py", "tests/loss/test_policy_loss.py")
DRY_TEST_SELECTION = "bitwise or slice_width or in_place"
PEERS = ("triton", "grad_in_forward", "liger_sm90", "liger_flce", "trl_chunked", "verl_lce", "cce")
# The dry run checks the code path of each kind of peer, not their speed: the cheap ones under the interpreter.
DRY_PEERS = ("triton", "grad_in_forward", "liger_sm90", "trl_chunked", "verl_lce", "cce")
GIB = 1 << 30


@dataclasses.dataclass
class Run:
    """One run: where it writes, CPU dry run or GPU, the deadline (time.monotonic()), and what it collected."""

    out: Path
    dry: bool
    deadline: float
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry else "cuda")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.dry else torch.bfloat16

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def shapes(self) -> list[tuple[str, int, int, int]]:
        from bench.roofline_paths import SHAPES

        return [DRY_SHAPE] if self.dry else [(name, n, *SHAPES[name]) for name, n in GPU_SHAPES]

    def log(self, text: str) -> None:
        print(text, flush=True)
        with (self.out / "run.log").open("a") as f:
            f.write(text + "\n")

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        (self.out / "results.md").write_text(render_markdown(self.results))


def _gpu_key(name: str) -> str:
    return "h200" if "H200" in name.upper() else "h100"


def section_environment(run: Run) -> dict[str, Any]:
    info: dict[str, Any] = run_metadata(run.device)
    if run.dry:
        return info
    props = torch.cuda.get_device_properties(run.device)
    info.update({"sms": props.multi_processor_count, "memory_bytes": props.total_memory,
                 "capability": list(torch.cuda.get_device_capability(run.device)),
                 "l2_bytes": getattr(props, "L2_cache_size", None)})
    from bench.gpu_kernels import seconds

    src = torch.empty(GIB // 2, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    info["copy_tb_per_s"] = 2 * src.numel() / seconds(lambda: dst.copy_(src), run.device) / 1e12
    a, b = (torch.randn(8192, 8192, device=run.device, dtype=torch.bfloat16) for _ in range(2))
    info["gemm_8192_tflops"] = 2 * 8192**3 / seconds(lambda: torch.mm(a, b), run.device) / 1e12
    return info


def section_kernels(run: Run) -> dict[str, Any]:
    from bench import gpu_kernels
    from bench.roofline_model import GPUS, Launch, Measured, Params, fit

    records, skipped = [], []
    for name, n, h, v in run.shapes():
        if not run.dry and run.left() < 60:
            skipped.append(f"{name} N={n}: deadline")
            continue
        rows = gpu_kernels.kernel_records(n, h, v, dtype=run.dtype, device=run.device,
                                          chunk_rows=16 if run.dry else 1766)
        records += [{**r, "shape": name, "N": n} for r in rows]
        run.log(f"kernels {name} N={n}: {len(rows)} launches timed")
    gpu = GPUS[_gpu_key(run.results.get("environment", {}).get("gpu", ""))]
    measured = [Measured(Launch(**r["launch"]), r["seconds"]) for r in records]
    fitted = fit(measured, gpu)
    for r, m in zip(records, measured):
        r["predicted_default_s"] = m.launch.seconds(gpu, Params())
        r["predicted_fitted_s"] = m.launch.seconds(gpu, fitted)
    return {"gpu_model": gpu.name, "fitted_params": dataclasses.asdict(fitted), "records": records,
            "skipped": skipped}


def section_paths(run: Run) -> dict[str, Any]:
    from bench import gpu_kernels, roofline_paths
    from bench.roofline_model import GPUS, Params

    params = Params(**run.results.get("kernels", {}).get("fitted_params", {}))
    gpu = GPUS[_gpu_key(run.results.get("environment", {}).get("gpu", ""))]
    records, skipped = [], []
    for name, n, h, v in run.shapes():
        if not run.dry and run.left() < 45:
            skipped.append(f"{name} N={n}: deadline")
            continue
        for r in gpu_kernels.path_records(n, h, v, dtype=run.dtype, device=run.device,
                                          workspace_bytes=1 << 30 if not run.dry else 16 * v * 4):
            if name in roofline_paths.SHAPES:
                model = (roofline_paths.no_logits(name, n) if r["impl"] == "triton"
                         else roofline_paths.grad_in_forward(name, n))
                r["predicted_ms"] = sum(model.times(gpu, params)) * 1e3
            records.append({**r, "shape": name})
        if name in roofline_paths.SHAPES:
            share = gpu_kernels.stand_in_kept_share(n, h, v, device=run.device, dtype=run.dtype)
            records.append({"shape": name, "N": n, "inputs": "peaked stand-in", "kept_share": share})
        run.log(f"paths {name} N={n}: done")
    return {"records": records, "skipped": skipped}


def section_hazards(run: Run) -> dict[str, Any]:
    from bench import hazards

    out: dict[str, Any] = {}
    rows, vocab, repeats = (8, 1007, 2) if run.dry else (4096, 151936, 20)
    out["in_place_mismatches"] = {str(dt).removeprefix("torch."): hazards.in_place_mismatches(
        rows=rows, vocab=vocab, dtype=dt, repeats=repeats, device=str(run.device))
        for dt in ((torch.float16,) if run.dry else (torch.bfloat16, torch.float16))}
    out["in_place_setup"] = {"rows": rows, "vocab": vocab, "repeats": repeats}
    out.update(hazards.path_checks(run.device, run.dtype, dry=run.dry))
    return out


def section_peers(run: Run) -> dict[str, Any]:
    from bench import fused_loss

    shapes = ["tiny"] if run.dry else ["qwen3-4b", "qwen3-8b"]
    counts = [64] if run.dry else [16384, 8192]
    records, skipped = [], []
    reps = ["--warmup", "0", "--repeat", "1"] if run.dry else ["--warmup", "1", "--repeat", "3"]
    args = fused_loss.parse_args([*reps, "--dtype", "fp16" if run.dry else "bf16", "--device", str(run.device)])
    for shape_name, n in zip(shapes, counts):
        shape = next(s for s in fused_loss.expand_shapes([shape_name], [n]))
        if not run.dry and run.left() < 60:
            skipped.append(f"{shape.label}: deadline")
            continue
        report = fused_loss.Report(rows=[], skipped=[])
        impls = [fused_loss.IMPLS[p] for p in (DRY_PEERS if run.dry else PEERS)]
        fused_loss.bench_shape(shape, impls, ["fwdbwd"], args, run.device, report)
        records += [dataclasses.asdict(r) for r in report.rows]
        skipped += report.skipped
    return {"rows": records, "skipped": skipped}


def section_tests(run: Run) -> dict[str, Any]:
    budget = int(max(30, min(120 if run.dry else 300, run.left() - (0 if run.dry else 90))))
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "tests.xml"
        select = ["-k", DRY_TEST_SELECTION] if run.dry else ["-m", "gpu or not gpu"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEVICE_TESTS, *select,
               f"--junitxml={xml}"]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=budget, check=False,
                                  env=os.environ.copy())
            rc, tail = proc.returncode, proc.stdout[-3000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = 124, f"TIMEOUT after {budget} s\n{(exc.stdout or b'')[-3000:]!r}"
        cases = []
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                              "seconds": float(case.get("time", 0.0))})
    return {"returncode": rc, "budget_s": budget, "cases": cases, "tail": tail}


def section_update_step(run: Run) -> dict[str, Any]:
    from bench.real_step import update_step

    if run.dry:
        return update_step(None, run.device, max_tokens=2048)
    return update_step("Qwen/Qwen3-4B", run.device)


def section_sweep(run: Run) -> dict[str, Any]:
    from bench.kernel_sweep import sweep

    return {"records": sweep(run.device, budget_s=30 if run.dry else max(10.0, run.left() - 15))}


SECTIONS: dict[str, tuple[Callable[[Run], dict[str, Any]], float]] = {
    # name: (function, seconds it needs at least on a GPU)
    "environment": (section_environment, 5),
    "kernels": (section_kernels, 60),
    "paths": (section_paths, 45),
    "hazards": (section_hazards, 40),
    "peers": (section_peers, 60),
    "tests": (section_tests, 60),
    "update_step": (section_update_step, 90),
    "sweep": (section_sweep, 30),
}


def render_markdown(results: dict[str, Any]) -> str:
    from bench.gpu_report import render

    return render(results)


def default_out() -> Path:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = "h200" if "H200" in gpu.upper() else ("h100" if "H100" in gpu.upper() else gpu.split()[-1].lower())
    return REPO_ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y-%m-%d}-{slug}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=None, help="folder for the results (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU check: tiny shapes under the Triton interpreter")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="seconds the whole run may take")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not names or any(s not in SECTIONS for s in names):
        p.error(f"--sections must be a comma list of {', '.join(SECTIONS)}, got {args.sections!r}")
    if args.deadline <= 0:
        p.error(f"--deadline must be a positive number of seconds, got {args.deadline}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or pass --dry-run (with TRITON_INTERPRET=1) for the CPU check")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry-run runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out=out, dry=args.dry_run, deadline=time.monotonic() + args.deadline)
    run.results["run"] = {"dry_run": args.dry_run, "deadline_s": args.deadline, "sections": {}}
    for name in names:
        fn, needs = SECTIONS[name]
        start = time.perf_counter()
        if run.left() < (0.0 if run.dry else needs):
            status = f"skipped: {max(0.0, run.left()):.0f} s left of the deadline, the section needs {needs:.0f} s"
        else:
            try:
                run.results[name] = fn(run)
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - one broken section is recorded; the others still run
                status = f"error: {type(exc).__name__}: {str(exc)[:500]}"
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        run.results["run"]["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
        run.log(f"{name}: {status} ({run.results['run']['sections'][name]['seconds']} s)")
        run.write()
    failed = [n for n, s in run.results["run"]["sections"].items() if s["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
