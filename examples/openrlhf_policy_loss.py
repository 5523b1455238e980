"""dsrl_fast's loss as OpenRLHF's PolicyLoss: same constructor and forward, plus samples= for NSR / PSR.

In an OpenRLHF run the swap is the launcher (see dsrl_fast/integrations/openrlhf/launch.py), in place of
`python -m openrlhf.cli.train_ppo_ray <args>`:
    python -m dsrl_fast.integrations.openrlhf.launch --dsrl.samples negative <args>
This script runs the loss on a random OpenRLHF-shaped micro-batch (openrlhf.models itself needs flash_attn).
Run: python examples/openrlhf_policy_loss.py
"""

from __future__ import annotations

import torch

from dsrl_fast.integrations.openrlhf import DSRLPolicyLoss


def main() -> None:
    torch.manual_seed(0)
    rows, length = 4, 6
    log_probs = (-torch.rand(rows, length)).requires_grad_()
    old = log_probs.detach() + 0.1 * torch.randn(rows, length)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(rows, length)
    mask = torch.ones(rows, length)
    for samples in ("all", "negative", "positive"):
        loss_fn = DSRLPolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=10.0, samples=samples,
                                 denominator="kept")
        loss, clip_ratio, ppo_kl, _, _ = loss_fn(log_probs, old, advantages, action_mask=mask)
        (grad,) = torch.autograd.grad(loss, log_probs)
        print(f"{samples:>8}: loss={loss.item():+.5f} clip_ratio={clip_ratio.item():.3f} ppo_kl={ppo_kl.item():.4f} "
              f"rows with gradient={int((grad.abs().sum(-1) > 0).sum())}")


if __name__ == "__main__":
    main()
