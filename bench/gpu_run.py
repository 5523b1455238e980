"""One short GPU run (≤ 8 minutes on one H100/H200) that measures what bench/roofline.py predicts.

    python -m bench.gpu_run OUT_DIR              # on a CUDA machine
    TRITON_INTERPRET=1 python -m bench.gpu_run OUT_DIR --dry-run   # CPU: tiny shapes, interpreter (CI)

Sections, each time-boxed, each writing into OUT_DIR (created): meta.json (GPU, versions, git sha, date, fp32 GEMM
path), tests.log + tests.xml (the fused-loss tests on the device, GPU-marked bf16 ones included), fused_loss.jsonl + .log
(our paths against Liger, CCE, TRL and verl with a same-run cuBLAS roofline), tile_sweep.jsonl (a few tile configs
of each kernel), l2_atomics.jsonl (fp32 atomic-add throughput into an L2-resident buffer against plain stores:
the figure the old design's model assumes), roofline.json + .log (the prediction, for the side-by-side table).
A failing section is recorded in summary.json and the run goes on; the exit status is 1 if any section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.harness import REPO_ROOT, run_metadata

FUSED_TESTS = ("tests/test_gemm.py", "tests/test_linear_logprobs.py", "tests/test_grad_in_forward.py",
               "tests/test_policy_loss.py")
PEERS = "naive,triton,grad_in_forward,liger_flce,cce,trl_chunked,verl_lce"


def _run(cmd: Sequence[str], log: Path, timeout: int) -> int:
    """Run `cmd` from the repository root, stdout+stderr to `log`; the exit status (124 on timeout)."""
    with log.open("w") as f:
        try:
            return subprocess.run(list(cmd), cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False, env=os.environ.copy()).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nTIMEOUT after {timeout} s\n")
            return 124


def section_tests(out: Path, dry: bool) -> int:
    select = ["-k", "bitwise or slice_width"] if dry else ["-m", "gpu or not gpu"]
    return _run([sys.executable, "-m", "pytest", "-q", "-x", *FUSED_TESTS, *select,
                 f"--junitxml={out / 'tests.xml'}"], out / "tests.log", 150)


def section_fused_loss(out: Path, dry: bool) -> int:
    if dry:
        args = ["--quick", "--device", "cpu", "--dtype", "fp32", "--impls", "naive,triton,grad_in_forward,trl_chunked",
                "--passes", "fwdbwd"]
    else:
        args = ["--shapes", "qwen3-4b,qwen3-8b", "--n", "8192,16384", "--dtype", "bf16", "--impls", PEERS,
                "--passes", "fwdbwd", "--warmup", "2", "--repeat", "5"]
    return _run([sys.executable, "-m", "bench.fused_loss", *args, "--results-dir", str(out)],
                out / "fused_loss.log", 200)


def section_roofline(out: Path, dry: bool) -> int:
    env_cmd = [sys.executable, "-m", "bench.roofline", "--json", str(out / "roofline.json"), "--steps"]
    if dry:
        env_cmd.append("--no-compile")
    return _run(env_cmd, out / "roofline.log", 120)


def section_tile_sweep(out: Path, dry: bool) -> int:
    from bench import kernel_sweep

    return kernel_sweep.sweep(out / "tile_sweep.jsonl", dry=dry, budget_s=20 if dry else 90)


def section_l2_atomics(out: Path, dry: bool) -> int:
    from bench import kernel_sweep

    return kernel_sweep.l2_atomics(out / "l2_atomics.jsonl", dry=dry)


SECTIONS: dict[str, Callable[[Path, bool], int]] = {
    "tests": section_tests, "fused_loss": section_fused_loss, "roofline": section_roofline,
    "tile_sweep": section_tile_sweep, "l2_atomics": section_l2_atomics,
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the results (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU check: tiny shapes under the Triton interpreter")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        p.error(f"--sections must be a comma list of {', '.join(SECTIONS)}, got {args.sections!r}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or pass --dry-run (with TRITON_INTERPRET=1) for the CPU check")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry-run runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if not args.dry_run else "cpu")
    (args.out / "meta.json").write_text(json.dumps({**run_metadata(device), "dry_run": args.dry_run}, indent=2))
    summary = {}
    for name in names:
        start = time.perf_counter()
        try:
            rc = SECTIONS[name](args.out, args.dry_run)
        except Exception as exc:  # noqa: BLE001 - one broken section is recorded; the others still run
            print(f"ERROR in section {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rc = -1
        summary[name] = {"rc": rc, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: rc={rc} in {summary[name]['seconds']} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(v["rc"] == 0 for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
