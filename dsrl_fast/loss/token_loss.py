"""The clipped policy loss over per-token log-probs (GRPO / NSR / PSR, conditional or marginal).

The loss is an O(N) function of the per-token log-probs, written once in PyTorch here; `policy_loss` (from hidden
states) and the gradient-in-forward path both evaluate it through `token_loss_terms`, so every path shares one
definition of the loss. Trainers that already have log-probs (TRL, verl, OpenRLHF) call `token_policy_loss`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.ops.validation import check_same_device, check_tensor


class PolicyLossOutput(NamedTuple):
    """loss: () fp32 scalar. logprobs, entropy: (N,) fp32 (entropy None when not computed).

    metrics: dict of () fp32 tensors (no host sync): "clip_frac", "ratio_mean", "kl_mean", "entropy_mean" (only
    when entropy is computed) and "kept_tokens".
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    metrics: dict[str, torch.Tensor]


def _kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    diff = logprobs - ref_logprobs
    if kl_type == "k1":
        return diff
    if kl_type == "k2":
        return 0.5 * diff.square()
    return torch.exp(-diff) + diff - 1.0


def sequence_index(seq_ids: torch.Tensor | None, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense sequence index (N,) int64 in [0, S) and S; without seq_ids every token is its own sequence."""
    if seq_ids is None:
        return torch.arange(n, device=device), n
    unique, inverse = torch.unique(seq_ids, return_inverse=True)
    return inverse, unique.numel()


def kept_tokens(advantages: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                 samples: str) -> torch.Tensor:
    """(N,) bool: masked-in tokens of the sequences `samples` keeps (a sequence is negative if any token has A < 0)."""
    if samples == "all":
        return mask
    hit = (advantages < 0) if samples == "negative" else (advantages > 0)
    per_seq = torch.zeros(num_seqs, device=mask.device, dtype=torch.int32)
    per_seq.index_add_(0, seq_index, (hit & mask).to(torch.int32))
    return mask & (per_seq[seq_index] > 0)


def token_weights(kept: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                   config: PolicyLossConfig) -> torch.Tensor:
    """(N,) fp32 weights w such that loss = Σ w·ℓ implements config.agg over the kept tokens."""
    keep = kept.float()
    if config.agg == "token-mean":
        if config.norm_tokens is not None:  # a host number: no tensor made from it (a device sync per call on GPU)
            return keep / max(float(config.norm_tokens), 1.0)
        return keep / keep.sum().clamp_min(1.0)
    seq_tokens = torch.zeros(num_seqs, device=keep.device).index_add_(0, seq_index, keep)
    kept_seqs = (seq_tokens > 0).float().sum().clamp_min(1.0)
    if config.agg == "seq-mean-token-mean":
        return keep / (seq_tokens[seq_index].clamp_min(1.0) * kept_seqs)
    if config.agg == "seq-mean-token-sum":
        return keep / kept_seqs
    assert config.agg == "seq-mean-token-sum-norm" and config.max_response_len is not None
    return keep / (kept_seqs * config.max_response_len)


_LOGPROB_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _validate_token_inputs(logprobs: torch.Tensor, advantages: torch.Tensor, entropy: torch.Tensor | None,
                           mask: torch.Tensor | None, old_logprobs: torch.Tensor | None,
                           ref_logprobs: torch.Tensor | None, seq_ids: torch.Tensor | None,
                           weights: torch.Tensor | None, config: PolicyLossConfig) -> None:
    """Raise TypeError/ValueError naming the argument unless the inputs follow `token_policy_loss`'s contract."""
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be (N,) packed or (B, T) padded, got shape {tuple(logprobs.shape)}")
    check_tensor("logprobs", logprobs, ndim=logprobs.dim(), dtypes=_LOGPROB_DTYPES)
    shape = tuple(logprobs.shape)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    check_tensor("advantages", advantages, ndim=advantages.dim(), dtypes=_LOGPROB_DTYPES)
    allowed = [shape] + ([(shape[0],), (shape[0], 1)] if len(shape) == 2 else [])
    if tuple(advantages.shape) not in allowed:
        raise ValueError(f"advantages must have shape {' or '.join(map(str, allowed))} (logprobs is {shape}), got "
                         f"{tuple(advantages.shape)}")
    for name, t, dtypes in (("entropy", entropy, _LOGPROB_DTYPES), ("mask", mask, (torch.bool,)),
                            ("old_logprobs", old_logprobs, (torch.float32, torch.float64)),
                            ("ref_logprobs", ref_logprobs, (torch.float32, torch.float64)),
                            ("seq_ids", seq_ids, (torch.int64, torch.int32)), ("weights", weights, _LOGPROB_DTYPES)):
        if t is None:
            continue
        check_tensor(name, t, ndim=len(shape), dtypes=dtypes)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logprobs' shape {shape}, got {tuple(t.shape)}")
    check_same_device("logprobs", logprobs, advantages=advantages, entropy=entropy, mask=mask,
                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, seq_ids=seq_ids, weights=weights)
    if seq_ids is not None and len(shape) == 2:
        raise ValueError("seq_ids must be None with padded (B, T) inputs (each row is one sequence), got a tensor")
    if config.agg != "token-mean" and seq_ids is None and len(shape) == 1:
        raise ValueError(f"agg={config.agg!r} needs seq_ids (N,) int64 or padded (B, T) inputs, got None")
    if config.kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs, got None")
    if advantages.numel() and bool(torch.isnan(advantages).any()):
        raise ValueError("advantages must not contain NaN, got at least one NaN")


def token_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, *, entropy: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, old_logprobs: torch.Tensor | None = None,
                      ref_logprobs: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None,
                      config: PolicyLossConfig = PolicyLossConfig()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The aggregated clipped loss from per-token log-probs that a trainer already has (TRL, verl, OpenRLHF, ...).

    Two layouts, told apart by logprobs' rank:
    - packed: logprobs (N,); advantages, entropy, mask, old_logprobs, ref_logprobs, seq_ids, weights (N,).
      seq_ids (N,) int64/int32 names each token's sequence (needed by the seq-mean aggregations; the NSR/PSR filter
      then acts per sequence, otherwise per token).
    - padded: logprobs (B, T), one right- or left-padded response per row; the other per-token tensors (B, T);
      advantages (B, T), (B, 1) or (B,); seq_ids must be None (row b is sequence b). Pass `mask` to drop padding.

    Args:
        logprobs: fp32/fp64/fp16/bf16 log-probs of the scored tokens under the current policy (differentiable).
        advantages: fp32/fp64/fp16/bf16 per-token (or per-row) advantages, no NaN.
        entropy: per-token entropy for the entropy bonus (config.entropy_coef) and the "entropy_mean" metric.
        mask: bool, tokens that count (None = all).
        old_logprobs: fp32/fp64 behaviour-policy log-probs; None = on-policy (old = logprobs.detach()).
        ref_logprobs: fp32/fp64 reference log-probs (needed when config.kl_coef != 0).
        weights: per-token rollout importance-sampling weights (e.g. π_old / π_sampler, truncated): they multiply the
            clipped policy-gradient term of each token (not the KL or entropy terms), without gradient, as TRL,
            verl and OpenRLHF apply them. None = 1.
        config: PolicyLossConfig.

    Returns:
        (loss () fp32, metrics dict of () fp32 tensors, see PolicyLossOutput). With no kept token the loss is 0 with
        a zero gradient.
    """
    _validate_token_inputs(logprobs, advantages, entropy, mask, old_logprobs, ref_logprobs, seq_ids, weights, config)
    if logprobs.dim() == 2:
        rows, cols = logprobs.shape
        advantages = (advantages if advantages.dim() == 2 else advantages.reshape(rows, 1)).expand(rows, cols)
        seq_ids = torch.arange(rows, device=logprobs.device).repeat_interleave(cols)
        flat = [None if t is None else t.reshape(-1)
                for t in (logprobs, advantages, entropy, mask, old_logprobs, ref_logprobs, weights)]
        logprobs, advantages, entropy, mask, old_logprobs, ref_logprobs, weights = flat
    return token_loss_terms(logprobs, advantages, entropy=entropy, mask=mask, old_logprobs=old_logprobs,
                              ref_logprobs=ref_logprobs, seq_ids=seq_ids, is_weights=weights, config=config)


def token_loss_terms(logprobs: torch.Tensor, advantages: torch.Tensor, *, entropy: torch.Tensor | None,
                       mask: torch.Tensor | None, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                       seq_ids: torch.Tensor | None, is_weights: torch.Tensor | None,
                       config: PolicyLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`token_policy_loss` on validated packed (N,) inputs (is_weights: its `weights`)."""
    n = logprobs.shape[0]
    device = logprobs.device
    mask = torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask
    seq_index, num_seqs = sequence_index(seq_ids, n, device)
    kept = kept_tokens(advantages, mask, seq_index, num_seqs, config.samples)
    weights = token_weights(kept, seq_index, num_seqs, config)
    adv = torch.where(kept, advantages.float(), 0.0)

    # Dropped tokens get log-ratio 0 so that garbage old/ref log-probs there cannot produce inf·0 = NaN gradients.
    old = logprobs.detach() if old_logprobs is None else old_logprobs.float()
    log_ratio = torch.where(kept, logprobs - old, 0.0)
    if config.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if config.clip_ratio_c is not None:
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -adv * config.clip_ratio_c), token_loss)
    if is_weights is not None:
        token_loss = token_loss * torch.where(kept, is_weights.detach().float(), 0.0)

    kl = None
    if ref_logprobs is not None and config.kl_coef != 0:
        kl = _kl(logprobs, torch.where(kept, ref_logprobs.float(), logprobs.detach()), config.kl_type)
        token_loss = token_loss + config.kl_coef * (kl * ratio if config.kl_ratio_weighted else kl)
    if entropy is not None and config.entropy_coef != 0:
        token_loss = token_loss - config.entropy_coef * torch.where(kept, entropy, 0.0)
    loss = (weights * token_loss).sum() * config.loss_scale

    kept_f = kept.float()
    count = kept_f.sum()
    denom = count.clamp_min(1.0)
    with torch.no_grad():
        metrics = {
            "clip_frac": ((clipped > unclipped).float() * kept_f).sum() / denom,
            "ratio_mean": (ratio * kept_f).sum() / denom,
            "kl_mean": (kl * kept_f).sum() / denom if kl is not None else count * 0.0,
            "kept_tokens": count,
        }
        if entropy is not None:
            metrics["entropy_mean"] = (torch.where(kept, entropy, 0.0)).sum() / denom
    return loss, metrics
