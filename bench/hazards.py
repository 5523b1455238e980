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


def policy_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
                 impl: str, workspace_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight) of dsrl_fast.loss.policy_loss (PolicyLossConfig defaults) through `impl`."""
    from dsrl_fast import PolicyLossConfig, policy_loss

    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = policy_loss(h, w, labels, advantages, config=PolicyLossConfig(), impl=impl,
                       workspace_bytes=workspace_bytes).loss
    d_hidden, d_weight = torch.autograd.grad(loss, (h, w))
    return d_hidden, d_weight


def host_syncs(run: Callable[[], object]) -> list[str]:
    """The synchronizing CUDA calls `run` makes (torch.cuda.set_sync_debug_mode "warn"), each as the Python line
    that made it ("file:line")."""
    import warnings

    seen: list[str] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchroniz" in str(warning.message):
            seen.append(f"{warning.filename}:{warning.lineno}")
    return seen


def path_checks(device: torch.device, dtype: torch.dtype, *, dry: bool) -> dict[str, object]:
    """Bitwise repeats, a half-masked batch, host syncs and the tile-skip error, at Qwen3-4B N = 8k on a GPU
    (the tiny shape on CPU)."""
    import time

    from bench.gpu_kernels import seconds
    from bench.standin_lm import zipf_logits

    n, h, v = (64, 64, 1007) if dry else (8192, 2560, 151936)
    workspace = 16 * v * 4 if dry else 1 << 30
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (4.0 / h**0.5)).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    advantages = torch.where(torch.arange(n, device=device) // 16 % 2 == 0, 1.0, -1.0)
    half = torch.where(torch.arange(n, device=device) // 16 % 2 == 0, 1.0, 0.0)  # every other sequence: no gradient
    out: dict[str, object] = {"shape": {"N": n, "H": h, "V": v}}
    for impl in ("triton", "grad_in_forward"):
        def grads(adv: torch.Tensor = advantages, impl: str = impl) -> tuple[torch.Tensor, torch.Tensor]:
            return policy_grads(hidden, weight, labels, adv, impl, workspace)

        out[f"{impl}_bitwise_differing_repeats"] = bitwise_repeats(grads, 2 if dry else 3)
        full_s, half_s = seconds(lambda: grads(), device), seconds(lambda: grads(half), device)
        d_hidden = grads(half)[0]
        out[f"{impl}_masked_half"] = {"full_ms": full_s * 1e3, "half_masked_ms": half_s * 1e3,
                                      "masked_rows_all_zero": bool((d_hidden[half == 0] == 0).all())}
        out[f"{impl}_host_syncs"] = host_syncs(grads) if device.type == "cuda" else "n/a on CPU"
    rows = zipf_logits(n, h, v, context_std=1.0, exponent=2.0, device=device)
    peaked = (rows.hidden.to(dtype), rows.weight.to(dtype), rows.labels)
    start = time.perf_counter()
    skip = policy_grads(*peaked, advantages, "triton")
    dense = _dense_grads(*peaked, advantages)
    out["tile_skip"] = {
        "rel_diff_d_hidden_vs_dense": float((skip[0].float() - dense[0].float()).norm() / dense[0].float().norm()),
        "rel_diff_d_weight_vs_dense": float((skip[1].float() - dense[1].float()).norm() / dense[1].float().norm()),
        "seconds": time.perf_counter() - start,
    }
    return out


def _dense_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-logits path's gradients with tile skipping off (the op with skip_threshold=None)."""
    from dsrl_fast import PolicyLossConfig
    from dsrl_fast.ops.linear_logprobs import FusedOptions, TritonLinearLogprobs
    from dsrl_fast import token_policy_loss

    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp, ent = TritonLinearLogprobs.apply(h, w, labels, FusedOptions(with_entropy=True, skip_threshold=None))
    loss = token_policy_loss(logp, advantages, entropy=ent.detach(), config=PolicyLossConfig())[0]
    d_hidden, d_weight = torch.autograd.grad(loss, (h, w))
    return d_hidden, d_weight
