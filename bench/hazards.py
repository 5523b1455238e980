"""Checks of the fused loss that only a GPU can settle: warp-order races, bitwise repeats and host syncs.

Each returns plain numbers for bench/gpu_run.py (and the GPU-marked tests); on CPU (Triton interpreter, tiny
shapes) they run too, which checks the code, not the hazard: the interpreter runs a program as one thread.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsrl_fast.kernels import logits_rows


def in_place_mismatches(*, rows: int, vocab: int, dtype: torch.dtype, repeats: int, device: str = "cuda",
                        seed: int = 0) -> int:
    """Elements where the row-gradient kernel writing 16-bit dz over the fp32 logits (the gradient-in-forward path)
    differs from the same kernel writing dz to its own memory, summed over `repeats` in-place runs.

    rows × vocab fp32 logits of std 3 (a fresh random chunk), entropy gradient on (the longest epilogue). A missing
    barrier shows as a nonzero count that changes between runs.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(rows, vocab, device=device, generator=gen) * 3.0
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    g_logp = torch.randn(rows, device=device, generator=gen)
    g_ent = torch.randn(rows, device=device, generator=gen)
    lse, _, ent = logits_rows.row_stats(z, labels, 1.0, True)
    assert ent is not None
    want = torch.empty(z.shape, dtype=dtype, device=device)
    logits_rows.row_grad(z, labels, lse, ent, g_logp, g_ent, 1.0, want)
    buffer = torch.empty_like(z)
    mismatches = 0
    for _ in range(repeats):
        buffer.copy_(z)
        out = buffer.view(dtype)[:, :vocab]
        logits_rows.row_grad(buffer, labels, lse, ent, g_logp, g_ent, 1.0, out)
        mismatches += int((out != want).sum())
    return mismatches


def bitwise_repeats(run: Callable[[], tuple[torch.Tensor, ...]], repeats: int) -> int:
    """How many of `repeats` further calls of `run` return outputs not bitwise equal to the first call's."""
    first = [t.clone() for t in run()]
    differing = 0
    for _ in range(repeats):
        again = run()
        differing += int(any(not torch.equal(a, b) for a, b in zip(first, again)))
    return differing
