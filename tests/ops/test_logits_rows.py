"""The gradient-in-forward row kernels: dz written over the fp32 logits equals dz written to its own memory.

Under the interpreter a program runs as one thread, so these CPU tests check the arithmetic and the in-place
layout, not the warp ordering; the ordering is checked from the sm_90a PTX (tests/bench/test_compile_report.py: the
barriers are there) and on a GPU (the stress test below, also run by bench/gpu_run.py).
"""

from __future__ import annotations

import pytest
import torch

from dsrl_fast.kernels import logits_rows
from tests.conftest import KERNEL_DEVICE
from tests.reference import logprobs_entropy_f64


def _chunk(rows: int, v: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, v, generator=gen) * 3.0).to(device)
    labels = torch.randint(0, v, (rows,), generator=gen).to(device)
    g_logp = torch.randn(rows, generator=gen).to(device)
    g_ent = torch.randn(rows, generator=gen).to(device)
    return z, labels, g_logp, g_ent


def _dz(z: torch.Tensor, labels: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor | None, dtype: torch.dtype,
        in_place: bool, block_v: int | None) -> torch.Tensor:
    lse, _, ent = logits_rows.row_stats(z, labels, 1.0, True, block_v=block_v)
    if in_place:
        buffer = z.clone()
        out = buffer if dtype == torch.float32 else buffer.view(dtype)[:, :z.shape[1]]
    else:
        out = torch.empty(z.shape, dtype=dtype, device=z.device)
    logits_rows.row_grad(buffer if in_place else z, labels, lse, ent if g_ent is not None else None, g_logp, g_ent,
                         1.0, out, block_v=block_v)
    return out.clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("rows", "v", "block_v"), [(3, 1007, 64), (5, 300, 128), (2, 4099, 256)])
def test_in_place_dz_equals_separate_output(rows: int, v: int, block_v: int, dtype: torch.dtype) -> None:
    """Many steps per row (1007 columns in 16 steps of 64: barriers at steps 0, 1, 2, 4, 8), tails included."""
    z, labels, g_logp, g_ent = _chunk(rows, v, KERNEL_DEVICE)
    separate = _dz(z, labels, g_logp, g_ent, dtype, in_place=False, block_v=block_v)
    in_place = _dz(z, labels, g_logp, g_ent, dtype, in_place=True, block_v=block_v)
    assert torch.equal(separate, in_place)
    # And it is the gradient: Σ_r g_logp·logp_r + g_ent·entropy_r w.r.t. z, against float64.
    z64 = z.detach().cpu().double().requires_grad_()
    logp, ent = logprobs_entropy_f64(z64, torch.eye(v, dtype=torch.float64), labels.cpu(), 1.0)
    want = torch.autograd.grad((logp * g_logp.cpu().double()).sum() + (ent * g_ent.cpu().double()).sum(), z64)[0]
    atol = 2e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(in_place.cpu().double(), want, rtol=0, atol=atol)


def test_barrier_schedule_covers_every_overlapping_read() -> None:
    """The module docstring's claim, checked over every step count up to 4096: the stores of step k (16-bit dz
    over fp32 logits) overlap the reads of step ⌊k/2⌋ only, and a barrier at a step in {0, 1, 2, 4, 8, ...} lies
    between those reads and the stores (the kernel's test `(k & (k - 1)) == 0`)."""
    block = 64
    for k in range(4096):
        first_cell, last_cell = k * block // 2, ((k + 1) * block - 1) // 2
        read_steps = {first_cell // block, last_cell // block}
        barriers = [b for b in range(k + 1) if (b & (b - 1)) == 0]
        assert read_steps == {k // 2} and max(barriers) >= k // 2, (k, read_steps, max(barriers))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_in_place_dz_is_bitwise_stable_on_many_rows(dtype: torch.dtype) -> None:
    """GPU stress: 2,048 rows of a Qwen-sized vocabulary, 10 in-place runs, each bitwise equal to a run writing
    dz to its own memory (a missing barrier shows as a moving difference)."""
    from bench.hazards import in_place_mismatches

    assert in_place_mismatches(rows=2048, vocab=151936, dtype=dtype, repeats=10) == 0
