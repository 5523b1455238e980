"""Peer-independent helpers of the integrations: peer normalizers, the marginal (PreRL) batch, import errors."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import torch

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.loss.logprobs import linear_logprobs
from dsrl_fast.loss.token_loss import token_policy_loss

DENOMINATORS = ("peer", "kept")


def pip_extra(peer: str) -> str:
    """The pip command that installs dsrl_fast with `peer`'s extra ("trl", "verl" or "openrlhf"): the peer at its
    own pins, one peer per environment (their pins exclude one another)."""
    return f"pip install 'dsrl_fast[{peer}]'"


def require(module: str, pip: str) -> ModuleType:
    """Import `module` or raise ImportError naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this integration needs {module!r}, which failed to import ({err}); install it with: "
                          f"{pip}") from err


def check_prefix(name: str, prefix: object) -> None:
    """ValueError naming `name` unless `prefix` is a non-empty tuple of token ids >= 0."""
    if not isinstance(prefix, tuple) or not prefix or not all(
            isinstance(t, int) and t >= 0 for t in prefix):
        raise ValueError(f"{name} must be a non-empty tuple of token ids >= 0, got {prefix!r}")


def peer_count(agg: str, mask: torch.Tensor, *, batch_num_tokens: float | None, global_batch_size: float | None,
               dp_size: int) -> torch.Tensor | float:
    """A peer's loss normalizer as this rank's count: tokens for agg="token-mean", sequences otherwise.

    mask: (B, T) bool. The peer's global count (batch_num_tokens / global_batch_size over all ranks) divided by
    dp_size when it gave one, else the micro-batch's own count (at least 1).
    """
    if agg == "token-mean":
        return mask.sum().clamp_min(1) if batch_num_tokens is None else batch_num_tokens / dp_size
    return mask.any(dim=-1).sum().clamp_min(1) if global_batch_size is None else global_batch_size / dp_size


def padded_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, *,
                           temperature: float, with_entropy: bool,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused log-probs (and entropy) of the kept positions of a padded batch, zeros elsewhere.

    hidden: (B, T, H) any float dtype (cast to the weight's); weight: (V, H); targets: (B, T) int; keep: (B, T)
    bool. Returns (log_probs (B, T) fp32, entropy (B, T) fp32 or None). Only the kept rows reach the LM head;
    masked_scatter keeps an all-masked batch connected to the graph (a zero gradient, not an error).
    """
    out = linear_logprobs(hidden[keep].to(weight.dtype), weight, targets[keep].long(), temperature=temperature,
                          with_entropy=with_entropy, impl=impl)
    log_probs = out.logprobs.new_zeros(keep.shape).masked_scatter(keep, out.logprobs)
    entropy = out.entropy.new_zeros(keep.shape).masked_scatter(keep, out.entropy) if with_entropy else None
    return log_probs, entropy


def kept_rows(advantages: torch.Tensor, mask: torch.Tensor, samples: str) -> torch.Tensor:
    """(B,) bool: rows with at least one kept token under the NSR/PSR filter. advantages, mask: (B, T)."""
    if samples == "all":
        return mask.any(dim=-1)
    hit = (advantages < 0) if samples == "negative" else (advantages > 0)
    return (hit & mask).any(dim=-1)


def peer_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                     old_logprobs: torch.Tensor | None, config: PolicyLossConfig,
                     weights: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                     entropy: torch.Tensor | None = None, denominator: str = "kept",
                     peer_count: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`token_policy_loss` on a peer's padded batch, normalized like the peer when asked.

    logprobs, old_logprobs, ref_logprobs, entropy, weights: (B, T) float; advantages: (B, T) or (B, 1); mask:
    (B, T) bool. denominator: "kept" divides by what config.agg counts among the kept tokens/sequences (the
    authors' NSR: dropped sequences leave numerator and denominator); "peer" divides by `peer_count` instead, the
    peer's own normalizer (a token count for agg="token-mean", a sequence count otherwise), so with samples="all"
    the loss equals the peer's. Returns (loss () fp32, metrics).
    """
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    if denominator == "peer" and peer_count is None:
        raise ValueError("denominator='peer' needs peer_count (the peer's token or sequence normalizer), got None")
    loss, metrics = token_policy_loss(logprobs, advantages, mask=mask, old_logprobs=old_logprobs,
                                      ref_logprobs=ref_logprobs, entropy=entropy, weights=weights, config=config)
    if denominator == "kept":
        return loss, metrics
    if config.agg == "token-mean":
        kept = metrics["kept_tokens"]
    else:
        kept = kept_rows(advantages.expand_as(mask), mask, config.samples).float().sum()
    return loss * (kept.clamp_min(1.0) / peer_count), metrics


def marginal_batch(responses: torch.Tensor, response_mask: torch.Tensor,
                   prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The marginal (pre-train space) rows [prefix; y] of right-padded responses, for a padded forward.

    responses: (B, T) int64 response token ids, right-padded; response_mask: (B, T) bool/int, 1 on real tokens.
    prefix: the context token ids (the authors use (151644,), Qwen's <|im_start|>).
    Returns input_ids (B, P+T) int64, attention_mask (B, P+T) int64, position_ids (B, P+T) int64 (0 at the
    prefix start). The log-probs of y are the last T positions' (logits_to_keep=T).
    """
    if responses.dim() != 2 or tuple(response_mask.shape) != tuple(responses.shape):
        raise ValueError(f"responses and response_mask must be (B, T) of one shape, got {tuple(responses.shape)} "
                         f"and {tuple(response_mask.shape)}")
    check_prefix("prefix", prefix)
    rows = responses.shape[0]
    head = torch.tensor(prefix, dtype=responses.dtype, device=responses.device).expand(rows, len(prefix))
    input_ids = torch.cat([head, responses], dim=1)
    attention_mask = torch.cat([torch.ones_like(head), response_mask.to(head.dtype)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids


def phase_config(config: PolicyLossConfig, *, samples: str, loss_scale: float) -> PolicyLossConfig:
    """The marginal (NSR-PreRL) phase's loss config: `config` with the phase's filter and scale, no KL."""
    return dataclasses.replace(config, samples=samples, loss_scale=loss_scale, kl_coef=0.0)
