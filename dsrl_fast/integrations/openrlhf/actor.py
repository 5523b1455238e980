"""OpenRLHF's `Actor.forward` on dsrl_fast's fused log-probs (`patch_actor_forward`).

OpenRLHF's forward casts the full (B, S, V) logits to fp32. The patched one runs the model's decoder, keeps the final
hidden states of the scored positions and hands them with the LM-head weight to `dsrl_fast.linear_logprobs`: no
vocabulary logits are materialized. It returns what OpenRLHF's forward returns (action log-probs (B, A) fp32, zero
where action_mask is 0; or all log-probs (B, S-1) with return_logprobs; `output.entropy` (B, S-1) with
return_entropy), at the Actor's temperature. Padded batches score only the action tokens (the entropy is zero
elsewhere: OpenRLHF's PPOActor reads it only there, masked); packed batches (packing_samples, ring attention) use
OpenRLHF's own unpad/gather helpers and score every packed token. `output.logits` is None. Tied embeddings: the head
weight is `get_output_embeddings().weight`, the embedding when tied. ZeRO-3 / FSDP2: the weight is gathered at call
time and, under ZeRO-3, registered with the Actor for its backward (`gathered_head_weight`). Calls that want logits
(no action_mask, no return_logprobs), VLM actors and MoE models that return router logits (OpenRLHF adds their aux
loss) run OpenRLHF's original forward.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch

from dsrl_fast.integrations.common import padded_linear_logprobs, pip_extra, require
from dsrl_fast.integrations.gathered_head import gathered_head_weight
from dsrl_fast.integrations.openrlhf.loss import OPENRLHF_GPU_ENV
from dsrl_fast.loss.logprobs import linear_logprobs
from dsrl_fast.model.packed import lm_head_weight
from dsrl_fast.ops.validation import IMPLS

_modeling_outputs = require("transformers.modeling_outputs", pip_extra("openrlhf"))

__all__ = ["patch_actor_forward"]


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
    temperature = float(actor.temperature)
    if actor.packing_samples:
        packed, position_ids, rolled, pad_len, indices = helpers.unpad_and_slice_tensor(
            sequences, attention_mask, ring_attn_group)
        hidden = decoder(packed, attention_mask=None, position_ids=position_ids, use_cache=False).last_hidden_state
        with gathered_head_weight(lm_head_weight(actor.model), actor) as weight:
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
        with gathered_head_weight(lm_head_weight(actor.model), actor) as weight:
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
    """Replace OpenRLHF's `Actor.forward` by the fused-log-prob forward (idempotent). Run it in each Ray actor
    process (`worker.setup_worker` does). impl: "auto" (Triton on CUDA) | "triton" | "torch".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    helpers = require("openrlhf.models.actor", OPENRLHF_GPU_ENV)
    actor_cls = helpers.Actor
    if getattr(actor_cls.forward, "_dsrl_fast", False):
        return
    original_forward = actor_cls.forward

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
    actor_cls.forward = forward
