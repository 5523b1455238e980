"""Outcome advantages from per-sample rewards, and the NSR / PSR sample filters.

Estimators (``r``: a sample's reward; group: the samples of one prompt; all per sample):

- ``"grpo"``: ``(r - mean) / (std + eps)``, ``std`` unbiased (``torch.std``), as verl's GRPO.
- ``"dr_grpo"``: ``r - mean`` (Dr. GRPO drops the std division).
- ``"marginal"``: ``r - mean``, the PreRL authors' advantage for the marginal (pre-train space) loss.
- ``"rloo"``: ``r - mean of the other samples of the group``.
- ``"reinforce_pp"``: ``(r - mu) / sqrt(var + 1e-8)`` over the whole batch, groups ignored
  (verl's REINFORCE++ outcome advantage without a KL term). verl whitens per token; pass
  ``token_counts`` (response lengths) to weight each sample by its tokens as verl does.

A group with a single sample gets advantage 0 under every group estimator (verl instead gives
GRPO singletons ``r`` itself and refuses RLOO singletons); so does a one-sample batch under
"reinforce_pp". Every estimator is a few vectorized ops with no host sync, except ``torch.unique``
on 1-D ``group_ids``.
"""

from __future__ import annotations

import torch

__all__ = ["ESTIMATORS", "FILTER_MODES", "broadcast_to_tokens", "compute_advantages", "sample_filter"]

ESTIMATORS = ("grpo", "dr_grpo", "marginal", "rloo", "reinforce_pp")
FILTER_MODES = ("all", "negative", "positive")


def _group_stats(r: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group size, group mean and the group's sum of squared deviations.

    ``inverse``: (N,) group index of each sample, in [0, N).
    """

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(r).index_add_(0, inverse, values)[inverse]

    count = per_group(torch.ones_like(r))
    mean = per_group(r) / count
    dev = r - mean
    return count, mean, per_group(dev * dev)


def _reinforce_pp(r: torch.Tensor, token_counts: torch.Tensor | None) -> torch.Tensor:
    w = torch.ones_like(r) if token_counts is None else token_counts.to(r.dtype)
    total = w.sum()
    mu = (w * r).sum() / total
    var = (w * (r - mu) ** 2).sum() / (total - 1).clamp(min=torch.finfo(r.dtype).tiny)  # Bessel, as verl
    return (r - mu) * torch.rsqrt(var + 1e-8)


def compute_advantages(
    rewards: torch.Tensor,
    estimator: str = "grpo",
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample advantages, same shape and dtype as ``rewards``.

    Args:
        rewards: (B, G) float, one row per prompt; or (N,) float with ``group_ids``.
        estimator: one of :data:`ESTIMATORS`.
        group_ids: (N,) int, the prompt of each sample (any values, any order); only with 1-D rewards.
        eps: added to the std by "grpo".
        token_counts: (N,) or (B, G) int/float response lengths; only for "reinforce_pp".
    """
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {getattr(rewards, 'dtype', type(rewards))}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if rewards.numel() == 0:
        raise ValueError(f"rewards must not be empty, got shape {tuple(rewards.shape)}")
    if rewards.dim() == 2:
        if group_ids is not None:
            raise ValueError("group_ids must be None when rewards is 2-D (B, G): rows are the groups")
        inverse = torch.arange(rewards.shape[0], device=rewards.device).repeat_interleave(rewards.shape[1])
    elif rewards.dim() == 1:
        if group_ids is None and estimator != "reinforce_pp":
            raise ValueError(f"group_ids must be given with 1-D rewards for estimator {estimator!r}")
        if group_ids is not None and (group_ids.shape != rewards.shape or group_ids.is_floating_point()):
            raise ValueError(
                f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}, "
                f"got {group_ids.dtype} {tuple(group_ids.shape)}"
            )
    else:
        raise ValueError(f"rewards must be 1-D (N,) or 2-D (B, G), got shape {tuple(rewards.shape)}")
    if token_counts is not None and (estimator != "reinforce_pp" or token_counts.shape != rewards.shape):
        raise ValueError(
            f"token_counts is only for 'reinforce_pp' and must have shape {tuple(rewards.shape)}, "
            f"got estimator {estimator!r} and shape {tuple(token_counts.shape)}"
        )
    r = rewards.reshape(-1)
    if estimator == "reinforce_pp":
        counts = None if token_counts is None else token_counts.reshape(-1)
        return _reinforce_pp(r, counts).reshape(rewards.shape)
    if rewards.dim() == 1:
        inverse = torch.unique(group_ids, return_inverse=True)[1]

    count, mean, sq = _group_stats(r, inverse)
    single = count < 2
    safe = torch.where(single, torch.full_like(count, 2.0), count)  # avoids 0/0 for singletons
    if estimator == "grpo":
        adv = (r - mean) / (torch.sqrt(sq / (safe - 1)) + eps)
    elif estimator == "rloo":
        adv = (r - mean) * safe / (safe - 1)
    else:
        adv = r - mean
    return torch.where(single, torch.zeros_like(adv), adv).reshape(rewards.shape)


def sample_filter(advantages: torch.Tensor, mode: str = "all") -> torch.Tensor:
    """Bool keep-mask, same shape: "all" keeps every sample, "negative" (NSR) those with A < 0,
    "positive" (PSR) those with A > 0. Dropped samples leave both the loss sum and its denominator."""
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a tensor, got {type(advantages).__name__}")
    if mode == "all":
        return torch.ones_like(advantages, dtype=torch.bool)
    if mode == "negative":
        return advantages < 0
    if mode == "positive":
        return advantages > 0
    raise ValueError(f"mode must be one of {FILTER_MODES}, got {mode!r}")


def broadcast_to_tokens(per_sample: torch.Tensor, sample_ids: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Per-token values from per-sample ones.

    Args:
        per_sample: (S,) any dtype, one value per sample (bool masks work too).
        sample_ids: (T,) int, the sample of each token; negative for tokens of no sample
            (prompt, padding), which get ``fill``. Checked against S on CPU only (no host sync on GPU).
    Returns: (T,) with ``per_sample``'s dtype.
    """
    if per_sample.dim() != 1:
        raise ValueError(f"per_sample must be 1-D (S,), got shape {tuple(per_sample.shape)}")
    if sample_ids.dim() != 1 or sample_ids.is_floating_point() or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be a 1-D integer tensor, got {sample_ids.dtype} {tuple(sample_ids.shape)}")
    if sample_ids.device.type == "cpu" and sample_ids.numel() and int(sample_ids.max()) >= per_sample.shape[0]:
        raise ValueError(f"sample_ids must be < {per_sample.shape[0]} (number of samples), got {int(sample_ids.max())}")
    valid = sample_ids >= 0
    values = per_sample[sample_ids.clamp(min=0)]
    return torch.where(valid, values, torch.full_like(values, fill))
