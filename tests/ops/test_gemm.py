"""matmul_into: fp32 accumulation of 16-bit GEMMs on every torch version's CUDA path, and the CPU reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from dsrl_fast.ops import gemm
from dsrl_fast.ops.gemm import GEMM_STRATEGIES, gemm_strategy, matmul_into
from tests.conftest import HAS_CUDA

SHAPES = [(1, 1, 1), (37, 50, 3), (5, 129, 64), (64, 7, 33)]


def _check_against_float64(device: str, dtype: torch.dtype, m: int, k: int, p: int, accumulate: bool) -> None:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, p, device=device).to(dtype)
    start = torch.randn(m, p, device=device)
    out = start.clone()
    matmul_into(out, a, b, accumulate=accumulate)
    expected = a.double() @ b.double() + (start.double() if accumulate else 0.0)
    # fp32 accumulation of exactly representable 16-bit products: |error| <= k * eps32 * sum_k |a||b| (+ one rounding
    # of the start value); a 16-bit intermediate would be off by ~eps16 = 2^-8, far above this bound.
    budget = (k + 2) * torch.finfo(torch.float32).eps * (a.double().abs() @ b.double().abs() + start.double().abs())
    assert out.dtype == torch.float32
    assert ((out.double() - expected).abs() <= budget).all(), (out.double() - expected).abs().max()


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "p"), SHAPES)
def test_cpu_reference_accumulates_in_fp32(m: int, k: int, p: int, dtype: torch.dtype, accumulate: bool) -> None:
    _check_against_float64("cpu", dtype, m, k, p, accumulate)


def test_same_dtype_out_stays_in_that_dtype() -> None:
    a, b = torch.randn(6, 5, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16)
    out = torch.ones(6, 3, dtype=torch.bfloat16)
    matmul_into(out, a, b, accumulate=True)
    torch.testing.assert_close(out, (1 + a.float() @ b.float()).to(torch.bfloat16), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("support", "plain", "accumulating"), [
    ((True, True), "mm_out_dtype", "addmm_out_dtype"),   # torch >= 2.10
    ((True, False), "mm_out_dtype", "mm_out_dtype_add"),  # torch 2.8 and 2.9: addmm rejects an fp32 self
    ((False, False), "upcast", "upcast"),                 # torch < 2.8: no out_dtype overloads
])
def test_strategy_follows_what_the_cuda_build_supports(support: tuple[bool, bool], plain: str, accumulating: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_cuda_out_dtype_support", lambda device: support)
    gemm._warn_once.cache_clear()
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert gemm_strategy(cuda, accumulate=False) == plain
            assert gemm_strategy(cuda, accumulate=True) == accumulating
    assert gemm_strategy(torch.device("cpu"), accumulate=True) == "upcast"
    assert {plain, accumulating} <= set(GEMM_STRATEGIES)
    # a slow path is said once per process, naming the torch version that is fast; the fast path says nothing
    slow = accumulating != "addmm_out_dtype"
    assert len(caught) == int(slow), [str(w.message) for w in caught]
    if slow:
        assert "torch >= 2.10" in str(caught[0].message)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(("m", "k", "p"), SHAPES)
def test_cuda_paths_accumulate_in_fp32(m: int, k: int, p: int, accumulate: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert HAS_CUDA
    supported = gemm._cuda_out_dtype_support(torch.device("cuda", torch.cuda.current_device()))
    combos = [(False, False)] + [(True, False)] * supported[0] + [(True, True)] * (supported[0] and supported[1])
    for combo in combos:  # every fallback this build can run, not only the one it picks
        monkeypatch.setattr(gemm, "_cuda_out_dtype_support", lambda device, combo=combo: combo)
        _check_against_float64("cuda", torch.bfloat16, m, k, p, accumulate)
