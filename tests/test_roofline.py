"""The roofline model of the fused loss (bench/roofline.py): the goals it predicts and the compiled-kernel inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dsrl_fast.kernels import linear_logprobs as kernels

from bench import roofline

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models() -> list[roofline.PathModel]:
    return roofline.build([8192, 16384, 32768], {})


def test_paths_do_their_stated_work(models: list[roofline.PathModel]) -> None:
    for m in models:
        nhv = m.n * m.h * m.v
        flops = sum(s.flops for s in m.steps)
        assert flops == pytest.approx({"old": 8, "triton": 8, "grad_in_forward": 6}[m.path] * nhv, rel=1e-9)
        atomics = sum(s.atomic_bytes for s in m.steps)
        if m.path == "old":
            # DESIGN.md §7: 597 GB of fp32 reductions at Qwen3-4B, N = 16k.
            if (m.shape, m.n) == ("qwen3-4b", 16384):
                assert atomics == pytest.approx(597e9, rel=0.01)
        else:
            assert atomics == 0


def test_predicted_goals(models: list[roofline.PathModel]) -> None:
    """Issue 10's goals, as predicted: default ≥ 65% of the 6NHV cuBLAS rate (≤ 75% ceiling), gradient-in-forward
    ≥ 80%, both far ahead of the old atomic design."""
    by_key = {(m.shape, m.n, m.path): m for m in models}
    for (shape, n, path), m in by_key.items():
        if path == "triton":
            assert 0.65 <= m.share <= 0.75 + 1e-9, (shape, n, m.share)
            assert m.share > 2 * by_key[(shape, n, "old")].share
        if path == "grad_in_forward":
            assert m.share >= 0.80, (shape, n, m.share)


@pytest.mark.parametrize(("v", "h"), [(1007, 64), (32000, 4096), (151936, 2560), (151936, 4096), (151936, 5120)])
def test_backward_workspace_is_a_small_share_of_the_logits(v: int, h: int) -> None:
    """dz slice + fp32 d_hidden accumulator per row within 3% of the row's fp32 logits wherever the accumulator
    leaves room (Qwen3-4B and -8B: H = 2560, 4096 at V = 151936; not H = 5120); the dz slice alone within 1%."""
    width = kernels.slice_width(v, 2, h)
    assert width % kernels.SLICE_MULTIPLE == 0 and width >= kernels.SLICE_MULTIPLE
    if v > 50 * kernels.SLICE_MULTIPLE:
        assert width * 2 <= 0.01 * v * 4
    if h * 4 + kernels.MIN_BUDGET_SLICES * kernels.SLICE_MULTIPLE * 2 <= 0.03 * v * 4:
        assert width * 2 + h * 4 <= 0.03 * v * 4, (width, h, v)
    else:  # the accumulator alone is near 3%: narrower slices would only slow the GEMMs
        assert width == kernels.slice_width(v, 2)


def test_printed_report_with_compiled_kernels(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.roofline", "--json", str(out), "--steps"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "% of 6NHV cuBLAS rate" in proc.stdout and "| qwen3-8b | 32768 | grad_in_forward" in proc.stdout
    data = json.loads(out.read_text())
    kernels_seen = data["kernels"]
    assert {"_forward_kernel entropy", "_dlogits_kernel logp", "_row_stats_kernel entropy",
            "_row_grad_kernel logp"} <= set(kernels_seen)
    for name, info in kernels_seen.items():
        assert info["spill_bytes"] == 0 and info["float_atomic_count"] == 0, name
        if name.startswith(("_forward_kernel", "_dlogits_kernel")):
            assert info["wgmma_count"] > 0, name
    assert len(data["models"]) == 2 * 3 * 3
