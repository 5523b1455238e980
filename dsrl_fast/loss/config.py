"""Options of the clipped policy loss, shared by every implementation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dsrl_fast.ops.tile_skip import DEFAULT_THRESHOLD as DEFAULT_SKIP_THRESHOLD

SampleFilter = Literal["all", "negative", "positive"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLType = Literal["k1", "k2", "k3"]

SAMPLE_FILTERS: tuple[str, ...] = ("all", "negative", "positive")
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES: tuple[str, ...] = ("k1", "k2", "k3")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_finite(name: str, value: float, *, positive: bool = False, non_negative: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """How per-token log-probs become the clipped policy loss.

    Attributes:
        clip_low: PPO clip ε_low; the ratio is clipped below at 1 - clip_low.
        clip_high: PPO clip ε_high; clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28).
        clip_ratio_c: dual-clip constant c (> 1); tokens with A < 0 have their loss capped at -A·c. None disables it.
        temperature: logits are divided by it before the softmax (match the sampler's temperature).
        samples: "all"; "negative" keeps only sequences with A < 0 (NSR); "positive" only A > 0 (PSR).
        agg: how kept token losses become one number: "token-mean", "seq-mean-token-mean",
            "seq-mean-token-sum" or "seq-mean-token-sum-norm" (Dr.GRPO; needs max_response_len).
        loss_scale: the aggregated loss is multiplied by it (e.g. the authors' pretrain loss coefficient 0.01).
        norm_tokens: with agg="token-mean", divide by this token count instead of the local kept count
            (gradient accumulation and data parallel: pass the global count).
        max_response_len: the constant token normalizer of "seq-mean-token-sum-norm".
        kl_coef: weight of the per-token KL penalty against ref_logprobs (0 disables it).
        kl_type: "k1" (logp - ref), "k2" (½(logp - ref)²) or "k3" (exp(ref - logp) - (ref - logp) - 1).
        entropy_coef: weight of the entropy bonus (the loss subtracts entropy_coef · entropy).
        log_ratio_clamp: the per-token log-ratio logp − old is clamped to [−c, c] before the exp, with no gradient
            where it clamps, as verl (the authors' code) and OpenRLHF do with c = 20. It changes the loss only where
            |logp − old| > c: with no dual clip, a token with A < 0 and logp − old > c then contributes −A·e^c with
            zero gradient instead of −A·e^(logp − old). None: no clamp (TRL's loss).
        kl_ratio_weighted: multiply each token's KL term by the ratio exp(logp − old) (with its gradient; clamped
            like the policy ratio), TRL's `use_bias_correction_kl`: the unbiased reverse-KL gradient on samples
            drawn from the old policy.
        skip_threshold: on the Triton path, the backward leaves out the (row block, vocabulary tile) pairs where
            every row's softmax mass is below this (2^-12 by default, within a per-row dropped-mass budget of 2^-9;
            the gradient error this allows is stated in dsrl_fast/ops/tile_skip.py); None computes every tile. The
            forward's values are exact either way.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None
    temperature: float = 1.0
    samples: SampleFilter = "all"
    agg: Aggregation = "token-mean"
    loss_scale: float = 1.0
    norm_tokens: int | None = None
    max_response_len: int | None = None
    kl_coef: float = 0.0
    kl_type: KLType = "k3"
    entropy_coef: float = 0.0
    log_ratio_clamp: float | None = 20.0
    kl_ratio_weighted: bool = False
    skip_threshold: float | None = DEFAULT_SKIP_THRESHOLD

    def __post_init__(self) -> None:
        _check_finite("clip_low", self.clip_low, non_negative=True)
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1 (the ratio floor is 1 - clip_low), got {self.clip_low!r}")
        _check_finite("clip_high", self.clip_high, non_negative=True)
        if self.clip_ratio_c is not None:
            _check_finite("clip_ratio_c", self.clip_ratio_c)
            if self.clip_ratio_c <= 1:
                raise ValueError(f"clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c!r}")
        _check_finite("temperature", self.temperature, positive=True)
        _check_choice("samples", self.samples, SAMPLE_FILTERS)
        _check_choice("agg", self.agg, AGGREGATIONS)
        _check_choice("kl_type", self.kl_type, KL_TYPES)
        _check_finite("loss_scale", self.loss_scale)
        _check_finite("kl_coef", self.kl_coef, non_negative=True)
        _check_finite("entropy_coef", self.entropy_coef)
        if self.log_ratio_clamp is not None:
            _check_finite("log_ratio_clamp", self.log_ratio_clamp, positive=True)
        if self.skip_threshold is not None and not 0 < self.skip_threshold < 1:
            raise ValueError(f"skip_threshold must be in (0, 1) or None, got {self.skip_threshold!r}")
        if not isinstance(self.kl_ratio_weighted, bool):
            raise TypeError(f"kl_ratio_weighted must be a bool, got {type(self.kl_ratio_weighted).__name__}")
        for name in ("norm_tokens", "max_response_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.agg == "seq-mean-token-sum-norm" and self.max_response_len is None:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_response_len (an int > 0), got None")
        if self.norm_tokens is not None and self.agg != "token-mean":
            raise ValueError(f"norm_tokens applies to agg='token-mean' only, got agg={self.agg!r}")
