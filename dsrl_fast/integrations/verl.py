"""verl: dsrl_fast's losses in verl's policy-loss registry and our fused log-probs behind its fused-kernel hook.

Install into the verl environment (`pip install 'dsrl_fast[verl]'`: verl 0.9.1 at its own pins) and launch verl
through `python -m dsrl_fast.integrations.verl_launch <verl overrides>`, which loads `verl_plugin` (this module's
`register()` and the marginal phase of `verl_marginal`) in verl's driver, Ray task runner and workers::

    actor_rollout_ref.actor.policy_loss.loss_mode=nsr            # or dsrl / psr / nsr_prerl
    actor_rollout_ref.model.use_fused_kernels=True actor_rollout_ref.model.fused_kernel_options.impl_backend=dsrl

Losses (signature of verl's `register_policy_loss`): the clip range, dual clip (verl's clip_ratio_c, always on in
its "vanilla" loss) and loss_agg_mode come from verl's ActorConfig; rollout IS weights are applied as `weights=`.
Every loss divides by verl's own normalizer: the mini-batch's token count (`batch_num_tokens`, all ranks) for
token-mean, its sequence count (`global_batch_size`) for the seq-mean modes, times dp_size, as verl's `agg_loss`
does. verl back-propagates each micro-batch unscaled, so the accumulated gradient does not depend on how the
mini-batch is split; without global counts (a direct call) the micro-batch's own counts are used, as in verl.
- "dsrl": all samples: equals verl's "vanilla".
- "nsr" / "psr": only sequences with A < 0 / A > 0 contribute; the others add zero to the numerator and, like
  every masked token in verl, still count in verl's denominator. (The marginal phase of `verl_marginal` also drops
  them from the denominator: it zeroes their loss mask before verl counts the mini-batch's tokens.)
- "nsr_prerl": "nsr" times 0.01, the authors' pretrain_loss_coef.
Build others with `make_policy_loss` and `register_policy_loss` under your own name.

The marginal (PreRL) phase needs marginal inputs, which verl's loss function never sees: it scores whatever
`input_ids` the actor is given. `dsrl_fast.integrations.verl_marginal` (loaded by the same plugin) runs it in verl's
v1 trainer: `trainer.v1.trainer_mode=dsrl` marks the warm-up updates and a worker hook rebuilds their rows as
``[151644] + response`` (positions from 0) and trains them with NSR × 0.01. `marginal_batch` builds the same rows
from right-padded `responses` / `response_mask` for a padded forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dsrl_fast.loss.config import SAMPLE_FILTERS, PolicyLossConfig
from dsrl_fast.integrations.common import kept_rows, marginal_batch, peer_count, peer_policy_loss, pip_extra, require
from dsrl_fast.loss.logprobs import linear_logprobs
from dsrl_fast.model.packed import lm_head_weight

_PIP = pip_extra("verl")
_core = require("verl.trainer.ppo.core_algos", _PIP)
_monkey_patch = require("verl.models.transformers.monkey_patch", _PIP)
_dense_common = require("verl.models.transformers.dense_common", _PIP)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REGISTERED = {"dsrl": ("all", 1.0), "nsr": ("negative", 1.0), "psr": ("positive", 1.0), "nsr_prerl": ("negative", 0.01)}
BACKEND = "dsrl"

__all__ = ["BACKEND", "REGISTERED", "forward_with_dsrl_backend", "loss_config_from_verl", "make_policy_loss",
           "marginal_batch", "register"]


def loss_config_from_verl(config: Any, loss_agg_mode: str, horizon: int, *, samples: str,
                          loss_scale: float) -> PolicyLossConfig:
    """PolicyLossConfig of verl's ActorConfig: clip_ratio(_low/_high), clip_ratio_c (dual clip), loss_agg_mode."""
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode must be one of {AGGREGATIONS} for dsrl_fast losses, got {loss_agg_mode!r}")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    norm = None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        norm = int(config.global_batch_info.get("loss_scale_factor") or horizon)
    return PolicyLossConfig(clip_low=low, clip_high=high, clip_ratio_c=config.get("clip_ratio_c", 3.0),
                            samples=samples, agg=loss_agg_mode, max_response_len=norm, loss_scale=loss_scale)


def _verl_count(config: Any, agg: str, mask: torch.Tensor) -> torch.Tensor | float:
    """verl's normalizer of `agg` for this micro-batch (agg_loss with its global_batch_info), as a local count."""
    info = config.global_batch_info
    return peer_count(agg, mask, batch_num_tokens=info.get("batch_num_tokens"),
                      global_batch_size=info.get("global_batch_size"), dp_size=info.get("dp_size", 1) or 1)


def make_policy_loss(samples: str = "all", *,
                     loss_scale: float = 1.0) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """A verl policy-loss function (register it with verl's `register_policy_loss(name)`), normalized by verl's
    global counts (see the module docstring).

    samples: "all" | "negative" (NSR) | "positive" (PSR). loss_scale: multiplies the loss.
    """
    if samples not in SAMPLE_FILTERS:
        raise ValueError(f"samples must be one of {SAMPLE_FILTERS}, got {samples!r}")

    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, T) verl tensors → (loss () fp32, metrics of floats)."""
        if config is None:
            raise ValueError("config (verl's ActorConfig) is required, got None")
        mask = response_mask.bool()
        cfg = loss_config_from_verl(config, loss_agg_mode, log_prob.shape[-1], samples=samples,
                                    loss_scale=loss_scale)
        loss, metrics = peer_policy_loss(log_prob, advantages, mask, old_logprobs=old_log_prob, config=cfg,
                                         weights=rollout_is_weights, denominator="peer",
                                         peer_count=_verl_count(config, cfg.agg, mask))
        with torch.no_grad():
            kept = kept_rows(advantages, mask, samples)[:, None] & mask
            log_ratio = torch.where(kept, log_prob - old_log_prob, 0.0)
            ppo_kl = (-log_ratio).sum() / kept.sum().clamp_min(1)
        return loss, {"actor/pg_clipfrac": metrics["clip_frac"].item(), "actor/ppo_kl": ppo_kl.item(),
                      "actor/dsrl_kept_tokens": metrics["kept_tokens"].item()}

    return policy_loss


def forward_with_dsrl_backend(self: torch.nn.Module, input_ids: torch.Tensor | None = None,
                              attention_mask: torch.Tensor | None = None,
                              position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                              inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                              use_cache: bool | None = None, return_dict: bool | None = None,
                              temperature: float = 1.0, shift_labels: torch.Tensor | None = None,
                              **kwargs: Any) -> Any:
    """verl's fused-kernel forward contract (`forward_with_torch_backend`) on dsrl_fast's fused log-probs.

    Returns verl's CausalLMOutputForPPO with log_probs and entropy (B, L) fp32 of the next token (labels rolled
    by one, as verl does, or verl's `shift_labels` as given). No (B, L, V) logits are built.
    """
    if return_dict is False:
        raise ValueError("forward_with_dsrl_backend returns a dict-like output, got return_dict=False")
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs[0]
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        targets = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        targets = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("forward_with_dsrl_backend needs labels, shift_labels or input_ids, got none")
    weight = lm_head_weight(self)
    out = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight,
                          targets.reshape(-1).to(torch.int64), temperature=float(temperature), with_entropy=True)
    return _dense_common.CausalLMOutputForPPO(log_probs=out.logprobs.view(targets.shape),
                                              entropy=out.entropy.view(targets.shape),
                                              past_key_values=outputs.past_key_values)


def _install_backend() -> None:
    """Make verl's fused-kernel hook accept impl_backend="dsrl" (other backends go to verl's own hook)."""
    original = _monkey_patch.patch_forward_with_backends
    if getattr(original, "_dsrl_fast", False):
        return

    def patch_forward_with_backends(model: torch.nn.Module, use_fused_kernels: bool = False,
                                    fused_kernels_backend: str | None = None) -> None:
        if not (use_fused_kernels and fused_kernels_backend == BACKEND):
            original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
            return
        model._verl_fused_kernels_backend = BACKEND
        model.__class__.forward = forward_with_dsrl_backend

    patch_forward_with_backends._dsrl_fast = True  # type: ignore[attr-defined]
    _monkey_patch.patch_forward_with_backends = patch_forward_with_backends


def register() -> None:
    """Register the losses of `REGISTERED` with verl and the "dsrl" fused-kernel backend (idempotent)."""
    for name, (samples, scale) in REGISTERED.items():
        _core.register_policy_loss(name)(make_policy_loss(samples, loss_scale=scale))
    _install_backend()
