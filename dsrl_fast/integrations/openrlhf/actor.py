"""OpenRLHF: a drop-in `PolicyLoss` on dsrl_fast's loss (GRPO / NSR / PSR / dual clip) and the patch that puts it
where OpenRLHF's Ray actor builds its loss.

OpenRLHF has no loss registry: `PPOActor.__init__` (openrlhf/trainer/ray/ppo_actor.py) calls the name
`PolicyLoss` it imported from `openrlhf.models`. `patch_policy_loss(...)` rebinds that name (in `openrlhf.models`,
`openrlhf.models.loss` and, once imported, `openrlhf.trainer.ray.ppo_actor`) to a factory of `DSRLPolicyLoss`.
The actor runs in Ray worker processes, so the patch must run there. One-line swap, in the driver before OpenRLHF
starts Ray::

    ray.init(runtime_env={"worker_process_setup_hook": "dsrl_fast.integrations.openrlhf.setup_worker",
                          "env_vars": {"DSRL_FAST_SAMPLES": "negative"}})

`setup_worker` reads DSRL_FAST_SAMPLES (all | negative | positive), DSRL_FAST_DENOMINATOR (peer | kept),
DSRL_FAST_LOSS_SCALE and DSRL_FAST_FUSED_LOGPROBS (1 | 0, default 1: also `patch_actor_forward`) from the
environment. Importing `openrlhf.models` needs flash_attn (OpenRLHF imports it at import time), which OpenRLHF's GPU
image has.

Fused log-probs: `patch_actor_forward()` replaces `openrlhf.models.actor.Actor.forward` (which casts the full
(B, S, V) logits to fp32) by one that runs the model's decoder, keeps the final hidden states of the scored positions
and hands them with the LM-head weight to `dsrl_fast.linear_logprobs`: no vocabulary logits are materialized. It
returns what OpenRLHF's forward returns (action log-probs (B, A) fp32, zero where action_mask is 0; or all
log-probs (B, S-1) with return_logprobs; `output.entropy` (B, S-1) with return_entropy), at the Actor's temperature.
Padded batches score only the action tokens (the entropy is zero elsewhere: OpenRLHF's PPOActor reads it only
there, masked); packed batches (packing_samples, ring attention) use OpenRLHF's own unpad/gather helpers and score
every packed token. `output.logits` is None. Tied embeddings: the head weight is `get_output_embeddings().weight`,
the embedding when tied. ZeRO-3: the patched `Actor.__init__` registers that weight as an external parameter of the
Actor, so DeepSpeed gathers it for the forward and the backward (the kernel recomputes logits there); patch before
the Actor is built. Calls that want logits (no action_mask, no return_logprobs), VLM actors and MoE models that
return router logits (OpenRLHF adds their aux loss) run OpenRLHF's original forward.

Supported OpenRLHF options: policy_loss_type "ppo", eps_clip_low_high, dual_clip, loss_agg_mode token-mean /
seq-mean-token-mean, and token-level ratio IS correction (is_correction_level="token", gating "ratio", mode "clip"
(TIS) or "mask" (ICEPOP)); the correction weights multiply the policy term through `weights=`. Sequence-level or
divergence-gated correction and GSPO raise a ValueError naming the option.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from dsrl_fast.config import PolicyLossConfig
from dsrl_fast.integrations.common import (
    DENOMINATORS,
    PIP_INTEGRATIONS,
    padded_linear_logprobs,
    peer_count,
    peer_policy_loss,
    require,
)
from dsrl_fast.logprobs import linear_logprobs
from dsrl_fast.model import lm_head_weight, register_lm_head_for_zero3
from dsrl_fast.validation import IMPLS

require("openrlhf", PIP_INTEGRATIONS + " && pip install --no-deps openrlhf==0.11.2")
_modeling_outputs = require("transformers.modeling_outputs", PIP_INTEGRATIONS)

__all__ = ["DSRLPolicyLoss", "patch_actor_forward", "patch_policy_loss", "setup_worker"]

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
    options; returns the factory. Run it in each Ray actor process (see `setup_worker`)."""
    DSRLPolicyLoss(samples=samples, denominator=denominator, loss_scale=loss_scale)  # validate the options now

    def factory(*args: Any, **kwargs: Any) -> DSRLPolicyLoss:
        return DSRLPolicyLoss(*args, samples=samples, denominator=denominator, loss_scale=loss_scale, **kwargs)

    for name in ("openrlhf.models", "openrlhf.models.loss"):
        require(name, "OpenRLHF's GPU environment (openrlhf.models imports flash_attn)").PolicyLoss = factory
    actor_module = sys.modules.get("openrlhf.trainer.ray.ppo_actor")
    if actor_module is not None:
        actor_module.PolicyLoss = factory
    return factory


def setup_worker() -> None:
    """Ray `worker_process_setup_hook`: `patch_policy_loss` with options from DSRL_FAST_SAMPLES,
    DSRL_FAST_DENOMINATOR and DSRL_FAST_LOSS_SCALE."""
    scale = os.environ.get("DSRL_FAST_LOSS_SCALE", "1.0")
    try:
        loss_scale = float(scale)
    except ValueError as err:
        raise ValueError(f"DSRL_FAST_LOSS_SCALE must be a number, got {scale!r}") from err
    fused = os.environ.get("DSRL_FAST_FUSED_LOGPROBS", "1")
    if fused not in ("0", "1"):
        raise ValueError(f"DSRL_FAST_FUSED_LOGPROBS must be '0' or '1', got {fused!r}")
    patch_policy_loss(samples=os.environ.get("DSRL_FAST_SAMPLES", "all"),
                      denominator=os.environ.get("DSRL_FAST_DENOMINATOR", "peer"), loss_scale=loss_scale)
    if fused == "1":
        patch_actor_forward()


def _wants_original(actor: torch.nn.Module, action_mask: torch.Tensor | None, return_logprobs: bool,
                    mm_inputs: dict[str, Any]) -> bool:
    """True for the calls the fused forward leaves to OpenRLHF: logits wanted, VLM, MoE router aux loss."""
    config = getattr(actor.model, "config", None)
    return ((action_mask is None and not return_logprobs) or bool(mm_inputs) or getattr(actor, "is_vlm", False)
            or bool(getattr(config, "output_router_logits", False)))


def _fused_forward(actor: torch.nn.Module, helpers: ModuleType, impl: str, sequences: torch.Tensor,
                   action_mask: torch.Tensor | None, attention_mask: torch.Tensor, return_output: bool,
                   ring_attn_group: Any, return_entropy: bool) -> Any:
    """OpenRLHF's Actor.forward contract on dsrl_fast's fused log-probs (see the module docstring).

    sequences, attention_mask: (B, S) int; action_mask: (B, A) or None. `helpers` is openrlhf.models.actor (its
    unpad_and_slice_tensor / gather_and_pad_tensor for packed batches).
    """
    if return_entropy and not return_output:
        raise ValueError("return_entropy=True needs return_output=True (as in OpenRLHF), got return_output=False")
    batch, seqlen = sequences.shape
    decoder = actor.model.get_decoder()
    weight = lm_head_weight(actor.model)
    if hasattr(weight, "ds_id") and id(weight) not in getattr(actor, "_external_params", {}):
        raise RuntimeError("the LM-head weight is ZeRO-3 partitioned but not registered with this Actor: call "
                           "patch_actor_forward() before the Actor is built")
    temperature = float(actor.temperature)
    if actor.packing_samples:
        packed, position_ids, rolled, pad_len, indices = helpers.unpad_and_slice_tensor(
            sequences, attention_mask, ring_attn_group)
        hidden = decoder(packed, attention_mask=None, position_ids=position_ids, use_cache=False).last_hidden_state
        out = linear_logprobs(hidden[0].to(weight.dtype), weight, rolled[0].long(), temperature=temperature,
                              with_entropy=return_entropy, impl=impl)

        def unpack(values: torch.Tensor) -> torch.Tensor:
            padded = helpers.gather_and_pad_tensor(values[None], ring_attn_group, pad_len, indices, batch, seqlen)
            return padded[:, :-1]

        log_probs = unpack(out.logprobs)
        entropy = unpack(out.entropy) if return_entropy else None
        if action_mask is not None:
            log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    else:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        hidden = decoder(sequences, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state[:, :-1]
        targets = sequences[:, 1:]
        if action_mask is None:
            keep = torch.ones_like(targets, dtype=torch.bool)
        else:
            width = action_mask.shape[1]
            hidden, targets, keep = hidden[:, -width:], targets[:, -width:], action_mask.bool()
        log_probs, scored = padded_linear_logprobs(hidden, weight, targets, keep, temperature=temperature,
                                                   with_entropy=return_entropy, impl=impl)
        entropy = None
        if scored is not None:  # (B, S-1): the scored window, zeros to its left
            entropy = torch.nn.functional.pad(scored, (seqlen - 1 - keep.shape[1], 0))
    if not return_output:
        return log_probs
    output = _modeling_outputs.CausalLMOutputWithPast(logits=None)
    if return_entropy:
        output.entropy = entropy
    return log_probs, output


def patch_actor_forward(*, impl: str = "auto") -> None:
    """Replace OpenRLHF's `Actor.forward` by the fused-log-prob forward and make `Actor.__init__` register the
    LM-head weight with ZeRO-3 (idempotent). Run it in each Ray actor process before the Actor is built (see
    `setup_worker`). impl: "auto" (Triton on CUDA) | "triton" | "torch".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    helpers = require("openrlhf.models.actor", "OpenRLHF's GPU environment (openrlhf.models imports flash_attn)")
    actor_cls = helpers.Actor
    if getattr(actor_cls.forward, "_dsrl_fast", False):
        return
    original_init, original_forward = actor_cls.__init__, actor_cls.forward

    @functools.wraps(original_init)
    def __init__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        register_lm_head_for_zero3(self, self.model)

    @functools.wraps(original_forward)
    def forward(self: torch.nn.Module, sequences: torch.Tensor, action_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_output: bool = False,
                allgather_logits: bool = False, return_logprobs: bool = False, ring_attn_group: Any = None,
                packed_seq_lens: list[int] | None = None, return_entropy: bool = False, **mm_inputs: Any) -> Any:
        if _wants_original(self, action_mask, return_logprobs, mm_inputs):
            return original_forward(self, sequences, action_mask, attention_mask, return_output=return_output,
                                    allgather_logits=allgather_logits, return_logprobs=return_logprobs,
                                    ring_attn_group=ring_attn_group, packed_seq_lens=packed_seq_lens,
                                    return_entropy=return_entropy, **mm_inputs)
        return _fused_forward(self, helpers, impl, sequences, action_mask, attention_mask, return_output,
                              ring_attn_group, return_entropy)

    forward._dsrl_fast = True  # type: ignore[attr-defined]
    actor_cls.__init__ = __init__
    actor_cls.forward = forward
