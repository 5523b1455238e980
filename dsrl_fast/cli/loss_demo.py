"""A CPU-sized demonstration of the fused policy loss: agreement with materialized logits and the memory it avoids."""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.loss.policy_loss import policy_loss
from dsrl_fast.ops.torch_logprobs import CHUNK_ELEMENTS


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _materialized_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
                       old_logprobs: torch.Tensor) -> torch.Tensor:
    """The textbook computation: full (N, V) logits, log_softmax, gather, clipped token-mean loss."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, labels[:, None]).squeeze(1)
    ratio = torch.exp(logp - old_logprobs)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()


def run_loss_demo(n: int = 2048, hidden_size: int = 128, vocab: int = 32000, seed: int = 0) -> dict[str, float]:
    """Run the fused loss and the materialized one on the same random batch and print how they compare.

    Returns the measured figures (max gradient error, loss error, logits bytes, peak RSS deltas, seconds).
    """
    torch.manual_seed(seed)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 3 / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    advantages = torch.where(torch.arange(n) // 256 % 2 == 0, 1.0, -1.0)
    with torch.no_grad():
        old = policy_loss(hidden, weight, labels, advantages, impl="torch").logprobs + 0.1 * torch.randn(n)

    rss0 = _max_rss_bytes()
    start = time.perf_counter()
    out = policy_loss(hidden, weight, labels, advantages, old_logprobs=old, config=PolicyLossConfig(), impl="torch")
    fused_dh, fused_dw = torch.autograd.grad(out.loss, (hidden, weight))
    fused_s = time.perf_counter() - start
    rss1 = _max_rss_bytes()

    start = time.perf_counter()
    naive = _materialized_loss(hidden, weight, labels, advantages, old)
    naive_dh, naive_dw = torch.autograd.grad(naive, (hidden, weight))
    naive_s = time.perf_counter() - start
    rss2 = _max_rss_bytes()

    logits_bytes = n * vocab * 4
    figures = {
        "loss_abs_error": abs(out.loss.item() - naive.item()),
        "grad_hidden_max_error": (fused_dh - naive_dh).abs().max().item(),
        "grad_weight_max_error": (fused_dw - naive_dw).abs().max().item(),
        "logits_bytes": float(logits_bytes),
        "fused_chunk_bytes": float(min(n, max(1, CHUNK_ELEMENTS // vocab)) * vocab * 4),
        "fused_peak_rss_delta": float(rss1 - rss0),
        "naive_peak_rss_delta": float(rss2 - rss1),
        "fused_seconds": fused_s,
        "naive_seconds": naive_s,
    }
    mib = 1 / 2**20
    print(f"policy loss on N={n} tokens, H={hidden_size}, V={vocab} (fp32, CPU, PyTorch path)")
    print(f"  fp32 logits a materialized loss needs : {logits_bytes * mib:8.1f} MiB (plus as much again for grads)")
    print(f"  largest logits chunk the fused path holds: {figures['fused_chunk_bytes'] * mib:6.1f} MiB")
    print(f"  peak RSS growth: fused {figures['fused_peak_rss_delta'] * mib:.1f} MiB, "
          f"materialized {figures['naive_peak_rss_delta'] * mib:.1f} MiB (measured in that order)")
    print(f"  agreement: |Δloss| = {figures['loss_abs_error']:.2e}, max |Δ d_hidden| = "
          f"{figures['grad_hidden_max_error']:.2e}, max |Δ d_weight| = {figures['grad_weight_max_error']:.2e}")
    print(f"  time: fused {fused_s:.2f} s, materialized {naive_s:.2f} s (CPU times are not GPU figures)")
    return figures


def add_loss_demo_parser(sub: argparse._SubParsersAction,
                         add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """The `loss-demo` subcommand."""
    demo = sub.add_parser("loss-demo", help="compare the fused policy loss with materialized logits on CPU")
    demo.add_argument("--tokens", type=int, default=2048, help="number of scored tokens N")
    demo.add_argument("--hidden", type=int, default=128, help="hidden size H")
    demo.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    add_debug(demo, argparse.SUPPRESS)
    demo.set_defaults(handler=_loss_demo)


def _loss_demo(args: argparse.Namespace) -> int:
    run_loss_demo(n=args.tokens, hidden_size=args.hidden, vocab=args.vocab)
    return 0
