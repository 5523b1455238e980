"""Shared benchmark harness: median timing, peak-memory delta, a same-run GEMM roofline and JSON-lines results.

Timing is always the median over an explicit number of repeats after an explicit warm-up, CUDA events on GPU and
`time.perf_counter` on CPU. Memory is the peak allocated *above* what was allocated before the call (GPU only).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dsrl_fast.ops.gemm import gemm_strategy

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
VERSIONED_PACKAGES = ("torch", "triton", "dsrl_fast", "liger_kernel", "cut_cross_entropy")
MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    """One measurement. value is a float, or "OOM" / "error" when the configuration could not be measured."""

    op: str
    impl: str
    shape: dict[str, Any]
    metric: str
    value: float | str
    unit: str


@dataclass(frozen=True)
class Roofline:
    """A cuBLAS (or CPU BLAS) GEMM of shape (M×K)@(K×N) timed in the same run: gemm_ms and its TFLOP/s."""

    gemm_ms: float
    gemm_flops: float

    @property
    def tflops(self) -> float:
        return self.gemm_flops / (self.gemm_ms * 1e9)

    def time_ms(self, flops: float) -> float:
        """The time a GEMM running at this rate needs for `flops` (the roofline of an op doing that work)."""
        return self.gemm_ms * flops / self.gemm_flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[Any], object], *, device: torch.device, warmup: int, repeat: int,
              setup: Callable[[], Any] | None = None) -> float:
    """Median wall time of `fn(setup())` in milliseconds (`fn(None)` without setup); setup is not timed.

    warmup: untimed calls first (compilation, autotuning, allocator warm-up). repeat: timed calls (>= 1).
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(f"warmup must be >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    prepare = setup or (lambda: None)
    for _ in range(warmup):
        fn(prepare())
    synchronize(device)
    samples = []
    for _ in range(repeat):
        state = prepare()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(state)
            samples.append((time.perf_counter() - begin) * 1e3)
        del state
    return statistics.median(samples)


def peak_memory_delta(fn: Callable[[Any], object], *, device: torch.device,
                      setup: Callable[[], Any] | None = None) -> int | None:
    """Peak bytes allocated during `fn(setup())` above what was allocated when it started; None off CUDA."""
    if device.type != "cuda":
        return None
    state = setup() if setup else None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(state)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def gemm_roofline(m: int, k: int, n: int, *, dtype: torch.dtype, device: torch.device, warmup: int,
                  repeat: int) -> Roofline:
    """Time one (m×k)@(k×n) matmul at `dtype` (cuBLAS on GPU): the rate a dense GEMM reaches on this device now.

    A fused op doing F FLOPs is compared with `Roofline.time_ms(F)`: the GEMM time scaled by F / (2·m·k·n). For the
    linear log-prob ops, m = N tokens, k = H, n = V, and F = 6·N·H·V for forward+backward (three GEMMs of this
    shape: logits, d_hidden, d_weight), 2·N·H·V for the forward and 4·N·H·V for the backward.
    """
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = median_ms(lambda _: torch.mm(a, b), device=device, warmup=warmup, repeat=repeat)
    return Roofline(gemm_ms=ms, gemm_flops=2.0 * m * k * n)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for allocation failures (CUDA OOM, host MemoryError) that should mark one configuration as OOM."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO_ROOT, check=False).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (absent packages are left out)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_metadata(device: torch.device) -> dict[str, Any]:
    """Fields shared by every row of one run: gpu, versions, git sha, timestamp, command line, and how the fused ops'
    16-bit GEMMs accumulate into fp32 on this torch build (dsrl_fast.ops.gemm)."""
    return {
        "gpu": device_name(device),
        "versions": package_versions(),
        "fp32_gemm": {"plain": gemm_strategy(device, accumulate=False),
                      "accumulate": gemm_strategy(device, accumulate=True)},
        "git_sha": _git_sha(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
    }


def append_rows(rows: Sequence[Row], *, name: str, results_dir: Path, meta: dict[str, Any]) -> Path:
    """Append `rows` as JSON lines (row fields + `meta`) to results_dir/<name>.jsonl; returns that path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.jsonl"
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**asdict(row), **meta}) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    assert all(len(r) == len(headers) for r in cells)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
