"""Outcome advantages from per-sample rewards, and the NSR / PSR sample filters.

Estimators (``r``: a sample's reward; group: the samples of one prompt; all per sample):

- ``"grpo"``: ``(r - mean) / (std + eps)``, ``std`` unbiased (``torch.std``), as verl's GRPO.
- ``"dr_grpo"``: ``r - mean`` (Dr. GRPO drops the std division).
- ``"marginal"``: ``r - mean``, the PreRL authors' advantage for the marginal (pre-train space) loss.
- ``"rloo"``: ``r - mean of the other samples of the group``.
- ``"reinforce_pp"``: ``(r - mu) / sqrt(var + 1e-8)`` over the whole batch, groups ignored
  (verl's REINFORCE++ outcome advantage without a KL term). verl whitens per token; pass
  ``token_counts`` (response lengths) to weight each sample by its tokens as verl does.
- ``"reinforce_pp_baseline"``: ``r - group mean``, then whitened over the whole batch like
  "reinforce_pp" (verl's REINFORCE++-baseline).

The batch estimators ("reinforce_pp", "reinforce_pp_baseline") whiten over the *global* batch when given
``reduce_sum`` (a function summing a small tensor over data-parallel ranks, e.g. an all-reduce): every rank
then gets the advantages one process holding all samples would compute.

Token-level estimators (PPO's critic, or a per-token KL penalty in the reward) work on padded (B, L)
tensors: :func:`gae` gives GAE advantages and returns, and with zero values and ``lam=1`` the discounted
returns; :func:`whiten` normalizes per-token values over the (global) batch.

A group with a single sample gets advantage 0 under every group estimator (verl instead gives
GRPO singletons ``r`` itself and refuses RLOO singletons); so does a one-sample batch under
"reinforce_pp". Every estimator is a few vectorized ops with no host sync, except ``torch.unique``
on 1-D ``group_ids``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["ESTIMATORS", "FILTER_MODES", "GAEOutput", "broadcast_to_tokens", "compute_advantages", "gae", "sample_filter",
           "whiten"]

ESTIMATORS = ("grpo", "dr_grpo", "marginal", "rloo", "reinforce_pp", "reinforce_pp_baseline")
BATCH_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")
ReduceSum = Callable[[torch.Tensor], torch.Tensor]
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


def whiten(values: torch.Tensor, weights: torch.Tensor | None = None, reduce_sum: ReduceSum | None = None,
           shift_mean: bool = True) -> torch.Tensor:
    """``(x - mu) / sqrt(var + 1e-8)`` with weighted mean and Bessel-corrected variance (verl's ``masked_whiten``).

    values: any shape, float. weights: same shape (token counts, or a 0/1 mask), None = 1.
    reduce_sum: sums a tensor over data-parallel ranks; the statistics are then those of the global batch.
    shift_mean: False adds the mean back (scale only). A batch of total weight <= 1 has variance 0 (its values
    become 0, or the mean when shift_mean is False).
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}")
    if weights is not None and weights.shape != values.shape:
        raise ValueError(f"weights must have shape {tuple(values.shape)}, got {tuple(weights.shape)}")
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    x = torch.where(w > 0, values, torch.zeros_like(values))  # padding may hold anything
    first = torch.stack([w.sum(), (w * x).sum()])
    if reduce_sum is not None:
        first = reduce_sum(first)
    total, mu = first[0], first[1] / first[0].clamp(min=torch.finfo(values.dtype).tiny)
    second = (w * (x - mu) ** 2).sum()
    if reduce_sum is not None:
        second = reduce_sum(second)
    var = second / (total - 1).clamp(min=torch.finfo(values.dtype).tiny)  # Bessel, as verl
    out = (x - mu) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mu


class GAEOutput(NamedTuple):
    """advantages, returns: (B, L) like the inputs; 0 at padded positions."""

    advantages: torch.Tensor
    returns: torch.Tensor


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> GAEOutput:
    """Generalized advantage estimation over right-padded responses (Schulman et al. 2016, as verl/OpenRLHF).

    Args:
        token_rewards: (B, L) float, reward of each response token (outcome reward on the last one, per-token
            penalties anywhere).
        values: (B, L) float, the critic's V(s_t) at each token (zeros give discounted returns with lam=1).
        mask: (B, L) bool, True on the response tokens (a prefix of each row).
        gamma, lam: discount and GAE λ, each in [0, 1].
    Returns:
        GAEOutput: A_t = Σ_k (γλ)^k δ_{t+k} with δ_t = r_t + γ V_{t+1} - V_t (V after the last token is 0), and
        returns A_t + V_t.
    """
    for name, t in (("token_rewards", token_rewards), ("values", values)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (B, L) float tensor, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if values.shape != token_rewards.shape or mask.shape != token_rewards.shape or mask.dtype != torch.bool:
        raise ValueError(f"values and mask (bool) must have shape {tuple(token_rewards.shape)}, got "
                         f"{tuple(values.shape)} and {mask.dtype} {tuple(mask.shape)}")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    m = mask.to(values.dtype)
    r, v = token_rewards * m, values * m
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return GAEOutput(adv, (adv + v) * m)


def compute_advantages(
    rewards: torch.Tensor,
    estimator: str = "grpo",
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    token_counts: torch.Tensor | None = None,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """Per-sample advantages, same shape and dtype as ``rewards``.

    Args:
        rewards: (B, G) float, one row per prompt; or (N,) float with ``group_ids``.
        estimator: one of :data:`ESTIMATORS`.
        group_ids: (N,) int, the prompt of each sample (any values, any order); only with 1-D rewards.
        eps: added to the std by "grpo".
        token_counts: (N,) or (B, G) int/float response lengths; only for the batch estimators "reinforce_pp"
            and "reinforce_pp_baseline" (each sample then weighs as its tokens in the whitening, as verl's).
        reduce_sum: sums a tensor over data-parallel ranks (the batch estimators then whiten over the global
            batch; groups must not span ranks); ignored by the group estimators.
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
    if token_counts is not None and (estimator not in BATCH_ESTIMATORS or token_counts.shape != rewards.shape):
        raise ValueError(
            f"token_counts is only for 'reinforce_pp' / 'reinforce_pp_baseline' and must have shape "
            f"{tuple(rewards.shape)}, "
            f"got estimator {estimator!r} and shape {tuple(token_counts.shape)}"
        )
    r = rewards.reshape(-1)
    counts = None if token_counts is None else token_counts.reshape(-1)
    if estimator == "reinforce_pp":
        return whiten(r, counts, reduce_sum).reshape(rewards.shape)
    if rewards.dim() == 1:
        inverse = torch.unique(group_ids, return_inverse=True)[1]

    count, mean, sq = _group_stats(r, inverse)
    if estimator == "reinforce_pp_baseline":
        return whiten(r - mean, counts, reduce_sum).reshape(rewards.shape)
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
