"""Peer-independent helpers of the integrations: peer normalizers, the marginal (PreRL) batch, import errors."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import torch

from dsrl_fast.config import PolicyLossConfig
from dsrl_fast.policy_loss import token_policy_loss

DENOMINATORS = ("peer", "kept")
PIP_INTEGRATIONS = "pip install 'dsrl_fast[integrations]'"


def require(module: str, pip: str) -> ModuleType:
    """Import `module` or raise ImportError naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this integration needs {module!r}, which failed to import ({err}); install it with: "
                          f"{pip}") from err


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
    if not prefix or not all(isinstance(t, int) and t >= 0 for t in prefix):
        raise ValueError(f"prefix must be a non-empty tuple of token ids >= 0, got {prefix!r}")
    rows = responses.shape[0]
    head = torch.tensor(prefix, dtype=responses.dtype, device=responses.device).expand(rows, len(prefix))
    input_ids = torch.cat([head, responses], dim=1)
    attention_mask = torch.cat([torch.ones_like(head), response_mask.to(head.dtype)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids


def phase_config(config: PolicyLossConfig, *, samples: str, loss_scale: float) -> PolicyLossConfig:
    """The marginal (NSR-PreRL) phase's loss config: `config` with the phase's filter and scale, no KL."""
    return dataclasses.replace(config, samples=samples, loss_scale=loss_scale, kl_coef=0.0)
