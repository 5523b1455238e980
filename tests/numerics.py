"""Three-way numeric comparison: our result vs float64 truth, budgeted by PyTorch's own error at the test dtype."""

from __future__ import annotations

import torch


def assert_within_budget(name: str, ours: torch.Tensor, peer: torch.Tensor, truth: torch.Tensor, *,
                         atol: float, factor: float = 2.0) -> None:
    """Require max|ours - truth| <= factor · max|peer - truth| + atol, naming the worst index on failure."""
    ours64, truth64 = ours.detach().double(), truth.detach().double()
    if ours64.shape != truth64.shape:
        raise AssertionError(f"{name}: shape {tuple(ours64.shape)} != reference {tuple(truth64.shape)}")
    if not torch.isfinite(ours64).all():
        raise AssertionError(f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(ours64))[:5].tolist()}")
    if ours64.numel() == 0:
        return
    err = (ours64 - truth64).abs()
    peer_err = (peer.detach().double() - truth64).abs().max().item()
    budget = factor * peer_err + atol
    worst = int(err.argmax())
    if err.max().item() > budget:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} at index {index} (ours {ours64.flatten()[worst].item():.6g}, "
            f"truth {truth64.flatten()[worst].item():.6g}) exceeds budget {budget:.3e} "
            f"= {factor}·peer error {peer_err:.3e} + atol {atol:.1e}"
        )
