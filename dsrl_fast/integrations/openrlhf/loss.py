"""OpenRLHF's `PolicyLoss` on dsrl_fast's loss (GRPO / NSR / PSR / dual clip), and the patch that puts it where
OpenRLHF's PPO actor builds its loss.

OpenRLHF has no loss registry: `ActorPPOTrainer.__init__` (openrlhf/trainer/ray/ppo_actor.py) calls the name
`PolicyLoss` it imported from `openrlhf.models`. `patch_policy_loss(...)` rebinds that name (in `openrlhf.models`,
`openrlhf.models.loss` and, once imported, `openrlhf.trainer.ray.ppo_actor`) to a factory of `DSRLPolicyLoss`.

Supported OpenRLHF options: policy_loss_type "ppo", eps_clip_low_high, dual_clip, loss_agg_mode token-mean /
seq-mean-token-mean, and token-level ratio IS correction (is_correction_level="token", gating "ratio", mode "clip"
(TIS) or "mask" (ICEPOP)); the correction weights multiply the policy term through `weights=`. Sequence-level or
divergence-gated correction and GSPO raise a ValueError naming the option.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.integrations.common import DENOMINATORS, peer_count, peer_policy_loss, pip_extra, require

OPENRLHF_GPU_ENV = "OpenRLHF's GPU environment (openrlhf.models imports flash_attn)"

require("openrlhf", pip_extra("openrlhf"))

__all__ = ["DSRLPolicyLoss", "patch_policy_loss"]

# OpenRLHF's PolicyLoss clamps log_probs - old_log_probs to ±20 before the exp (openrlhf/models/loss.py)
LOG_RATIO_CLAMP = 20.0


class DSRLPolicyLoss(torch.nn.Module):
    """OpenRLHF's PolicyLoss contract on dsrl_fast's `token_policy_loss`.

    Constructor: OpenRLHF's PolicyLoss arguments plus samples ("all" | "negative" | "positive"), denominator
    ("peer": OpenRLHF's global token/sample counts, equal to its loss with samples="all"; "kept": the kept
    tokens/sequences of the micro-batch, the authors' NSR) and loss_scale. The log-ratio is clamped to ±20 before the
    exp, with no gradient where it clamps, as in OpenRLHF (PolicyLossConfig.log_ratio_clamp).
    forward: log_probs, old_log_probs, advantages, action_mask (B, T), rollout_log_probs (B, T) or None, dp_size,
    batch_num_tokens, global_batch_size → (loss, clip_ratio, ppo_kl, vllm_kl | None, is_filter_ratio | None).
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: tuple[float, float] | list[float] = (0.5, 5.0), *, samples: str = "all",
                 denominator: str = "peer", loss_scale: float = 1.0) -> None:
        super().__init__()
        if policy_loss_type != "ppo":
            raise ValueError(f"policy_loss_type must be 'ppo' with DSRLPolicyLoss, got {policy_loss_type!r}")
        if is_correction_level not in ("off", "token"):
            raise ValueError(f"is_correction_level must be 'off' or 'token' with DSRLPolicyLoss, got "
                             f"{is_correction_level!r}")
        if is_correction_level == "token" and is_correction_gating != "ratio":
            raise ValueError(f"is_correction_gating must be 'ratio' with DSRLPolicyLoss, got {is_correction_gating!r}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be 'mask' or 'clip', got {is_correction_mode!r}")
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
        self.config = PolicyLossConfig(clip_low=clip_eps_low, clip_high=clip_eps_high, clip_ratio_c=dual_clip,
                                       samples=samples, loss_scale=loss_scale,
                                       agg="token-mean" if token_level_loss else "seq-mean-token-mean",
                                       log_ratio_clamp=LOG_RATIO_CLAMP)
        self.correction = None if is_correction_level == "off" else is_correction_mode
        self.threshold = tuple(is_correction_threshold)
        self.denominator = denominator

    def _is_weights(self, old_log_probs: torch.Tensor,
                    rollout_log_probs: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-token IS weights π_train/π_rollout (clamped for "clip", zeroed out of band for "mask") and the
        out-of-band indicator."""
        if self.correction is None:
            return None, None
        if rollout_log_probs is None:
            raise ValueError("is_correction_level='token' needs rollout_log_probs (B, T), got None")
        low, high = self.threshold
        ratio = (old_log_probs - rollout_log_probs).detach().exp()
        outside = (ratio < low) | (ratio > high)
        weights = ratio.clamp(low, high) if self.correction == "clip" else torch.where(outside, 0.0, ratio)
        return weights, outside

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None, rollout_log_probs: torch.Tensor | None = None,
                dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None) -> tuple[torch.Tensor, ...]:
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        weights, outside = self._is_weights(old_log_probs, rollout_log_probs)
        count = None
        if self.denominator == "peer":
            count = peer_count(self.config.agg, mask, batch_num_tokens=batch_num_tokens,
                               global_batch_size=global_batch_size, dp_size=dp_size)
        loss, metrics = peer_policy_loss(log_probs, advantages, mask, old_logprobs=old_log_probs,
                                         config=self.config, weights=weights, denominator=self.denominator,
                                         peer_count=count)
        with torch.no_grad():
            maskf = mask.float()
            tokens = maskf.sum().clamp_min(1)
            ppo_kl = ((old_log_probs - log_probs) * maskf).sum() / tokens
            vllm_kl = filtered = None
            if outside is not None:
                vllm_kl = ((rollout_log_probs - old_log_probs) * maskf).sum() / tokens
                filtered = (outside.float() * maskf).sum() / tokens
        return loss, metrics["clip_frac"], ppo_kl, vllm_kl, filtered


def patch_policy_loss(*, samples: str = "all", denominator: str = "peer",
                      loss_scale: float = 1.0) -> Callable[..., DSRLPolicyLoss]:
    """Rebind OpenRLHF's `PolicyLoss` (where PPOActor looks it up) to a factory of DSRLPolicyLoss with these
    options; returns the factory. Run it in each Ray actor process (`worker.setup_worker` does)."""
    DSRLPolicyLoss(samples=samples, denominator=denominator, loss_scale=loss_scale)  # validate the options now

    def factory(*args: Any, **kwargs: Any) -> DSRLPolicyLoss:
        return DSRLPolicyLoss(*args, samples=samples, denominator=denominator, loss_scale=loss_scale, **kwargs)

    for name in ("openrlhf.models", "openrlhf.models.loss"):
        require(name, OPENRLHF_GPU_ENV).PolicyLoss = factory
    actor_module = sys.modules.get("openrlhf.trainer.ray.ppo_actor")
    if actor_module is not None:
        actor_module.PolicyLoss = factory
    return factory
